<#
.SYNOPSIS
  Windows-side watchdog for pose-service under WSL.

.DESCRIPTION
  Every -IntervalSec it GETs the pose-service health URL from Windows.
    - Any HTTP answer (200, or a JSON 503 while the supervisor restarts) means the VM is alive:
      systemd and the daemon's own supervisor handle everything inside it.
    - No answer: it probes the VM with `wsl.exe -d <Distro> --exec true` (with a timeout).
        * VM answers but the service does not, -FailThreshold times in a row:
          `systemctl reset-failed` + `restart` of the unit (as root, through wsl.exe).
        * VM does not answer (timeout, or exit 4294967295 = Wsl/Service/E_UNEXPECTED), -FailThreshold
          times in a row: `wsl --shutdown`, then start the keep-alive task (or the distro) again.
  After each recovery it waits -GraceSec (models load after boot) before counting again.
  Linux-side supervision cannot see or fix a broken WSL VM; this can.

  Log: %LOCALAPPDATA%\pose-service\wsl-health.log. Normally registered by keepalive.ps1 -HealthWatch.

.EXAMPLE
  powershell -ExecutionPolicy Bypass -File wsl-health.ps1 -Distro Ubuntu
.EXAMPLE
  powershell -ExecutionPolicy Bypass -File wsl-health.ps1 -Distro Ubuntu -Once   # one check, exit 0/1
#>
[CmdletBinding()]
param(
    [Parameter(Mandatory = $true)]
    [string] $Distro,
    [string] $Url = "http://127.0.0.1:5000/v1/health",
    [string] $Unit = "pose-service",
    [string] $KeepAliveTask = "WSL keep-alive ($Distro)",
    [int] $IntervalSec = 30,
    [int] $FailThreshold = 3,
    [int] $HttpTimeoutSec = 5,
    [int] $ProbeTimeoutSec = 30,
    [int] $GraceSec = 180,
    [switch] $Once
)

$ErrorActionPreference = 'Stop'
$wsl = Join-Path $env:WINDIR 'System32\wsl.exe'
$logDir = Join-Path $env:LOCALAPPDATA 'pose-service'
New-Item -ItemType Directory -Force -Path $logDir | Out-Null
$logFile = Join-Path $logDir 'wsl-health.log'

function Write-Log([string] $msg) {
    $line = "{0:yyyy-MM-dd HH:mm:ss} {1}" -f (Get-Date), $msg
    Write-Host $line
    Add-Content -Path $logFile -Value $line
}

# Returns $true when the gateway answered at all (any HTTP status), and the body's status word.
function Test-Http {
    try {
        $r = Invoke-WebRequest -Uri $Url -UseBasicParsing -TimeoutSec $HttpTimeoutSec
        $status = '?'
        try { $status = ($r.Content | ConvertFrom-Json).status } catch { }
        return @($true, "HTTP $($r.StatusCode) $status")
    } catch {
        $resp = $_.Exception.Response
        if ($resp) { return @($true, "HTTP $([int]$resp.StatusCode)") }
        return @($false, $_.Exception.Message)
    }
}

# Runs wsl.exe with a wall-clock limit; returns the exit code, or $null on timeout.
function Invoke-Wsl([string[]] $wslArgs, [int] $timeoutSec) {
    $p = Start-Process -FilePath $wsl -ArgumentList $wslArgs -NoNewWindow -PassThru
    $null = $p.Handle  # keeps ExitCode readable after exit
    if (-not $p.WaitForExit($timeoutSec * 1000)) {
        try { $p.Kill() } catch { }
        return $null
    }
    return $p.ExitCode
}

function Test-Vm {
    $code = Invoke-Wsl @('-d', $Distro, '--exec', 'true') $ProbeTimeoutSec
    if ($null -eq $code) { return @($false, "wsl.exe probe timed out after $ProbeTimeoutSec s") }
    if ($code -ne 0) {
        $hint = if ($code -eq -1 -or $code -eq 4294967295) { ' (Wsl/Service/E_UNEXPECTED?)' } else { '' }
        return @($false, "wsl.exe probe exited $code$hint")
    }
    return @($true, 'VM answers')
}

function Restart-Unit {
    Write-Log "restarting $Unit inside $Distro"
    Invoke-Wsl @('-d', $Distro, '-u', 'root', '--exec', 'systemctl', 'reset-failed', $Unit) 30 | Out-Null
    $code = Invoke-Wsl @('-d', $Distro, '-u', 'root', '--exec', 'systemctl', 'restart', '--no-block', $Unit) 30
    Write-Log "systemctl restart exit: $code"
}

function Restart-Vm {
    Write-Log "wsl --shutdown"
    $code = Invoke-Wsl @('--shutdown') 60
    if ($null -eq $code) {
        Write-Log "wsl --shutdown hung; trying to restart the WSL Windows service (needs admin)"
        foreach ($svc in @('WslService', 'LxssManager')) {
            try { Restart-Service -Name $svc -Force; Write-Log "restarted service $svc"; break } catch { }
        }
    }
    Start-Sleep -Seconds 5
    if (Get-ScheduledTask -TaskName $KeepAliveTask -ErrorAction SilentlyContinue) {
        Stop-ScheduledTask -TaskName $KeepAliveTask -ErrorAction SilentlyContinue
        Start-ScheduledTask -TaskName $KeepAliveTask
        Write-Log "started task '$KeepAliveTask'"
    } else {
        # Boots the VM; systemd then starts the enabled unit. Nothing holds it open afterwards.
        $code = Invoke-Wsl @('-d', $Distro, '--exec', 'true') $ProbeTimeoutSec
        Write-Log "booted $Distro (exit $code); no keep-alive task '$KeepAliveTask' found"
    }
}

$vmFails = 0
$svcFails = 0
Write-Log "watching $Url (distro $Distro, every $IntervalSec s, threshold $FailThreshold)"
while ($true) {
    $http = Test-Http
    if ($http[0]) {
        if ($vmFails -or $svcFails) { Write-Log "recovered: $($http[1])" }
        $vmFails = 0; $svcFails = 0
        if ($Once) { Write-Log "ok: $($http[1])"; exit 0 }
    } else {
        $vm = Test-Vm
        if ($vm[0]) { $svcFails++; $vmFails = 0 } else { $vmFails++; $svcFails = 0 }
        Write-Log ("no answer from {0} ({1}); {2} [vm {3}/{4}, service {5}/{4}]" -f
            $Url, $http[1], $vm[1], $vmFails, $FailThreshold, $svcFails)
        if ($Once) { exit 1 }
        if ($vmFails -ge $FailThreshold) {
            Restart-Vm; $vmFails = 0; $svcFails = 0
            Start-Sleep -Seconds $GraceSec
            continue
        }
        if ($svcFails -ge $FailThreshold) {
            Restart-Unit; $svcFails = 0
            Start-Sleep -Seconds $GraceSec
            continue
        }
    }
    Start-Sleep -Seconds $IntervalSec
}
