// Usage: node dist/example.js /abs/path/to/video.mp4 [out.json]
// Submits a path job, prints progress, writes the native result to result.json.
import { writeFile } from "node:fs/promises";
import { PoseServiceClient, PoseServiceError } from "./index.js";

interface Proc {
  argv: string[];
  exitCode?: number;
}
const proc = (globalThis as unknown as { process: Proc }).process;

async function main(): Promise<void> {
  const [videoPath, out = "result.json"] = proc.argv.slice(2);
  if (!videoPath) {
    console.error("usage: example <video_path> [out.json]");
    proc.exitCode = 2;
    return;
  }
  const client = new PoseServiceClient();
  const health = await client.health();
  console.log(`pose-service at ${client.baseUrl}: ${health.status}`);

  const job = await client.submitPath(videoPath, `example:${videoPath}`);
  console.log(`job ${job.job_id} ${job.status}`);

  const result = await client.waitForResult(job.job_id, {
    pollMs: 1000,
    timeoutMs: 30 * 60_000,
    onProgress: (s) => console.log(`${s.status} ${s.frames_done}/${s.frames_total ?? "?"} (attempt ${s.attempts})`),
  });
  const withPeople = result.frames.filter((f) => f.persons.length > 0).length;
  console.log(
    `${result.frames.length} frames (${withPeople} with a person), engine ${result.engine.name} on ${result.engine.device}`,
  );
  await writeFile(out, JSON.stringify(result));
  console.log(`wrote ${out}`);
}

main().catch((err: unknown) => {
  if (err instanceof PoseServiceError) console.error(`pose-service error (${err.status}): ${err.message}`);
  else console.error(err);
  proc.exitCode = 1;
});
