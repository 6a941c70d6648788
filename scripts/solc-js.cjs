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
function resolveSolc() {
  const roots = [process.env.X402_ESCROW_ROOT, path.join(__dirname, ".."), __dirname].filter(Boolean);
  for (const root of roots) {
    try {
      return require.resolve("solc", { paths: [root] });
    } catch (_) {
      /* try the next root */
    }
  }
  process.stderr.write("solc-js.cjs: npm package `solc` not found; run `npm ci` in the x402-escrow checkout\n");
  process.exit(2);
}

const args = process.argv.slice(2);
const solcPath = resolveSolc();
// Loading soljson (instantiating the wasm) costs most of a second: a cache hit skips it.
let loaded;
const solc = () => (loaded ??= require(solcPath));

if (args.includes("--version")) {
  // Native solc prints exactly these two lines; py-solc-x parses the second.
  process.stdout.write(`solc, the solidity compiler commandline interface\nVersion: ${solc().version()}\n`);
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

// A content-addressed compile cache, so that the same standard-JSON input given to the same
// compiler is compiled once per checkout (solc is deterministic: the output is a function of
// these). The key is the sha256 of the exact input, the compiler's version, the soljson file and
// this script. Sources the compiler reads from disk through `findImports` (inputs that give
// `urls`, as crytic-compile's do) are not in the input: each entry lists the files read with their
// hashes, and a hit requires every one to read the same again, else it is compiled afresh. Only
// outputs without errors are kept. X402_ESCROW_SOLC_CACHE names the folder (default: .build/
// of this checkout, never committed), or `off`; X402_ESCROW_SOLC_CACHE_LOG=1 reports hits and
// misses on stderr (any other value: appends them to that file).
const crypto = require("crypto");
const sha256 = (data) => crypto.createHash("sha256").update(data).digest("hex");

const solcDir = path.dirname(solcPath); // <checkout>/node_modules/solc

function cacheDir() {
  const chosen = process.env.X402_ESCROW_SOLC_CACHE;
  if (chosen === "off") return null;
  return path.resolve(chosen || path.join(solcDir, "..", "..", ".build", "solc-js-cache"));
}

function compilerId() {
  const { version } = JSON.parse(fs.readFileSync(path.join(solcDir, "package.json"), "utf8"));
  const soljson = fs.readFileSync(path.join(solcDir, "soljson.js"));
  return [version, sha256(soljson), sha256(fs.readFileSync(__filename))].join("\n");
}

// What an import resolves to, as a comparable fingerprint (a missing file is one too).
function fingerprint(found) {
  return found.contents !== undefined ? sha256(found.contents) : `error: ${found.error}`;
}

function log(message) {
  const to = process.env.X402_ESCROW_SOLC_CACHE_LOG;
  if (to === "1") process.stderr.write(`solc-js.cjs: ${message}\n`);
  else if (to) fs.appendFileSync(to, `${message}\n`);
}

function sleep(ms) {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

function alive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return e.code === "EPERM";
  }
}

// Two consumers compiling the same input at once (xdist workers: the artifacts test and Ape's
// check) compile it once: the first holds <key>.lock while it compiles, the other waits and then
// reads its entry. A lock whose process is gone is taken over; after 20 minutes of waiting the
// input is compiled anyway. Returns whether the lock is held.
function lock(lockPath) {
  const deadline = Date.now() + 20 * 60 * 1000;
  for (;;) {
    try {
      fs.writeFileSync(lockPath, String(process.pid), { flag: "wx" });
      return true;
    } catch (e) {
      if (e.code !== "EEXIST") return false;
    }
    try {
      const holder = Number(fs.readFileSync(lockPath, "utf8"));
      const age = Date.now() - fs.statSync(lockPath).mtimeMs;
      if (holder ? !alive(holder) : age > 10_000) fs.unlinkSync(lockPath);
    } catch (_) {
      /* released meanwhile: try again */
    }
    if (Date.now() > deadline) return false;
    sleep(200);
  }
}

function cachedCompile(input) {
  const dir = cacheDir();
  if (!dir) return solc().compile(input, { import: findImports });
  const key = sha256(`x402-escrow solc-js cache v1\n${compilerId()}\n${input}`);
  const entryPath = path.join(dir, `${key}.json`);
  // Logs a miss the first time only (`again`: after taking the lock).
  const lookup = (again) => {
    let entry;
    try {
      entry = JSON.parse(fs.readFileSync(entryPath, "utf8"));
    } catch (_) {
      if (!again) log(`cache miss ${key}`);
      return undefined;
    }
    const stale = Object.entries(entry.reads).find(([file, print]) => fingerprint(findImports(file)) !== print);
    if (stale) {
      if (!again) log(`cache miss ${key}: ${stale[0]} changed`);
      return undefined;
    }
    log(`cache hit ${key}`);
    return entry.output;
  };
  const hit = lookup(false);
  if (hit !== undefined) return hit;
  fs.mkdirSync(dir, { recursive: true });
  const lockPath = `${entryPath}.lock`;
  const locked = lock(lockPath);
  try {
    const meanwhile = locked ? lookup(true) : undefined;
    if (meanwhile !== undefined) return meanwhile;
    const reads = {};
    const recordingImports = (importPath) => {
      const found = findImports(importPath);
      reads[importPath] = fingerprint(found);
      return found;
    };
    const output = solc().compile(input, { import: recordingImports });
    log(`compiled ${key}`);
    const failed = (JSON.parse(output).errors || []).some((e) => e.severity === "error");
    if (!failed) {
      // Written whole then renamed: a reader never sees half an entry.
      const tmp = `${entryPath}.${process.pid}.tmp`;
      fs.writeFileSync(tmp, JSON.stringify({ reads, output }));
      fs.renameSync(tmp, entryPath);
    }
    return output;
  } finally {
    if (locked) fs.unlinkSync(lockPath);
  }
}

const input = fs.readFileSync(0, "utf8");
process.stdout.write(cachedCompile(input));
