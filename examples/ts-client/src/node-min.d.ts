// The two Node APIs example.ts uses, declared here so the package needs no @types/node.
// (If @types/node is installed these merge with its declarations.)
declare module "node:fs/promises" {
  export function writeFile(path: string, data: string): Promise<void>;
}
