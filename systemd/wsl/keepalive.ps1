<#
.SYNOPSIS
  Keep a WSL distro (and the pose-service systemd unit inside it) running while you are logged on.

.DESCRIPTION
  systemd services do not keep a WSL VM alive: once the last wsl.exe session ends, WSL stops the
  distro (microsoft/WSL#8854; in 2.6.1 after 15-20 s, #13416). This registers a Task Scheduler job
  for the current user that runs
      wsl.exe -d <Distro> --exec sleep infinity
  at logon and again every 5 minutes (a no-op while one is running), and restarts it on failure.
  With -HealthWatch it also registers wsl-health.ps1 (next to this script) as a second logon task.

  Copy both scripts to a Windows folder first (not \\wsl.localhost\...: that path needs the very
  VM this task is meant to start), e.g.
      mkdir $env:LOCALAPPDATA\pose-service
      copy \\wsl.localhost\Ubuntu\opt\pose-service\systemd\wsl\*.ps1 $env:LOCALAPPDATA\pose-service\
  No administrator rights are needed.

.EXAMPLE
  powershell -ExecutionPolicy Bypass -File keepalive.ps1 -Distro Ubuntu -HealthWatch
.EXAMPLE
  powershell -ExecutionPolicy Bypass -File keepalive.ps1 -Distro Ubuntu -Unregister
#>
[CmdletBinding()]
param(
    [Parameter(Mandatory = $true)]
    [string] $Distro,
    [string] $TaskName = "WSL keep-alive ($Distro)",
    [switch] $HealthWatch,
    [string] $HealthTaskName = "pose-service health watch ($Distro)",
    # Passed to wsl-health.ps1 when -HealthWatch is given.
    [string] $HealthUrl = "http://127.0.0.1:5000/v1/health",
    [switch] $Unregister
)

$ErrorActionPreference = 'Stop'

if ($Unregister) {
    foreach ($name in @($TaskName, $HealthTaskName)) {
        if (Get-ScheduledTask -TaskName $name -ErrorAction SilentlyContinue) {
            Stop-ScheduledTask -TaskName $name -ErrorAction SilentlyContinue
            Unregister-ScheduledTask -TaskName $name -Confirm:$false
            Write-Host "removed task '$name'"
        }
    }
    return
}

# `wsl -l -q` prints UTF-16; strip the NULs PowerShell 5.1 leaves in.
$wsl = Join-Path $env:WINDIR 'System32\wsl.exe'
$distros = (& $wsl -l -q) -replace "`0", '' | ForEach-Object { $_.Trim() } | Where-Object { $_ }
if ($distros -notcontains $Distro) {
    throw "WSL distro '$Distro' not found. Installed: $($distros -join ', ')"
}

$user = "$env:USERDOMAIN\$env:USERNAME"
$principal = New-ScheduledTaskPrincipal -UserId $user -LogonType Interactive -RunLevel Limited

# Hidden PowerShell host so no console window stays open; it exits with wsl.exe's code, so a
# dead VM (e.g. exit 4294967295, Wsl/Service/E_UNEXPECTED) counts as a failure and is restarted.
$inner = "& '$wsl' -d '$Distro' --exec sleep infinity; exit `$LASTEXITCODE"
$action = New-ScheduledTaskAction -Execute 'powershell.exe' `
    -Argument "-NoProfile -NonInteractive -WindowStyle Hidden -Command `"$inner`""

$atLogon = New-ScheduledTaskTrigger -AtLogOn -User $user
# Safety net for exits that Task Scheduler does not treat as failures (wsl --shutdown exits 0).
$every5 = New-ScheduledTaskTrigger -Once -At (Get-Date).AddMinutes(1) -RepetitionInterval (New-TimeSpan -Minutes 5)

$settings = New-ScheduledTaskSettingsSet `
    -RestartCount 999 -RestartInterval (New-TimeSpan -Minutes 1) `
    -ExecutionTimeLimit ([TimeSpan]::Zero) `
    -MultipleInstances IgnoreNew `
    -AllowStartIfOnBatteries -DontStopIfGoingOnBatteries -StartWhenAvailable

Register-ScheduledTask -TaskName $TaskName -Action $action -Trigger @($atLogon, $every5) `
    -Settings $settings -Principal $principal `
    -Description "Holds WSL distro '$Distro' open so systemd services (pose-service) keep running." `
    -Force | Out-Null
Start-ScheduledTask -TaskName $TaskName
Write-Host "registered and started '$TaskName'"

if ($HealthWatch) {
    $script = Join-Path $PSScriptRoot 'wsl-health.ps1'
    if (-not (Test-Path $script)) { throw "wsl-health.ps1 not found next to this script ($script)" }
    if ($script -like '\\wsl*') { throw "copy the scripts to a Windows folder first (see Get-Help $PSCommandPath)" }
    $hAction = New-ScheduledTaskAction -Execute 'powershell.exe' -Argument (
        "-NoProfile -NonInteractive -WindowStyle Hidden -ExecutionPolicy Bypass -File `"$script`" " +
        "-Distro `"$Distro`" -Url `"$HealthUrl`" -KeepAliveTask `"$TaskName`"")
    Register-ScheduledTask -TaskName $HealthTaskName -Action $hAction -Trigger $atLogon `
        -Settings $settings -Principal $principal `
        -Description "Restarts WSL distro '$Distro' when pose-service stops answering." `
        -Force | Out-Null
    Start-ScheduledTask -TaskName $HealthTaskName
    Write-Host "registered and started '$HealthTaskName' (log: $env:LOCALAPPDATA\pose-service\wsl-health.log)"
}
