#!/usr/bin/env node
// A stand-in for the native `solc` binary, backed by the npm package `solc`
// (solc-js, wasm). No native compiler can be downloaded here, so py-solc-x and
// ape-solidity call this script instead: it answers `--version` in the native
// format and compiles `--standard-json` from stdin, printing only the JSON
// output (solcjs's own CLI prints a warning line first, which breaks parsers).
"use strict";
const fs = require("fs");
const path = require("path");

// Resolve `solc` from this repository's node_modules even when the script is
// installed (copied) under ~/.solcx: X402_ESCROW_ROOT points back home.
function loadSolc() {
  const roots = [process.env.X402_ESCROW_ROOT, path.join(__dirname, ".."), __dirname].filter(Boolean);
  for (const root of roots) {
    try {
      return require(require.resolve("solc", { paths: [root] }));
    } catch (_) {
      /* try the next root */
    }
  }
  process.stderr.write("solc-js.cjs: npm package `solc` not found; run `npm ci` in the x402-escrow checkout\n");
  process.exit(2);
}

const args = process.argv.slice(2);
const solc = loadSolc();

if (args.includes("--version")) {
  // Native solc prints exactly these two lines; py-solc-x parses the second.
  process.stdout.write(`solc, the solidity compiler commandline interface\nVersion: ${solc.version()}\n`);
  process.exit(0);
}

if (!args.includes("--standard-json")) {
  process.stderr.write("solc-js.cjs: only --version and --standard-json are supported\n");
  process.exit(2);
}

// Imports not given inline are read from disk, but only below the allowed
// roots (the base path and --allow-paths), as native solc would.
function option(name) {
  const i = args.indexOf(name);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : undefined;
}
const basePath = option("--base-path") || process.cwd();
const allowed = [basePath, ...(option("--allow-paths") || "").split(",").filter(Boolean)].map((p) =>
  path.resolve(p),
);
function findImports(importPath) {
  const candidates = path.isAbsolute(importPath)
    ? [importPath]
    : allowed.map((root) => path.join(root, importPath));
  for (const file of candidates) {
    const resolved = path.resolve(file);
    if (!allowed.some((root) => resolved === root || resolved.startsWith(root + path.sep))) continue;
    if (fs.existsSync(resolved)) return { contents: fs.readFileSync(resolved, "utf8") };
  }
  return { error: `File not found: ${importPath}` };
}

const input = fs.readFileSync(0, "utf8");
process.stdout.write(solc.compile(input, { import: findImports }));
