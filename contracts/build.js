#!/usr/bin/env node
// Compiles the contracts with solc-js and writes contracts/artifacts/<Name>.json.
//
//   node contracts/build.js                  write the artifacts
//   node contracts/build.js --check          exit 1 if a committed artifact is stale
//   node contracts/build.js --artifacts DIR  use DIR instead of contracts/artifacts
//
// Sources are given to solc by repo-relative source unit names ("contracts/MintToken.sol",
// "@openzeppelin/contracts/..."), never absolute paths, so the metadata hash embedded in the
// bytecode, and therefore the artifacts, are the same on every machine.
"use strict";

const crypto = require("crypto");
const fs = require("fs");
const path = require("path");
const solc = require("solc");

const ROOT = path.resolve(__dirname, "..");
const NODE_MODULES = path.join(ROOT, "node_modules");
const DEFAULT_ARTIFACTS = path.join(__dirname, "artifacts");

const CONTRACTS = {
  MintToken: "contracts/MintToken.sol",
  MockUSDC: "contracts/MockUSDC.sol",
};

// anvil 1.7.1 defaults to a post-Osaka hardfork; Prague is solc 0.8.30's default target and runs
// there and on every chain mintq is meant for.
const SETTINGS = {
  evmVersion: "prague",
  optimizer: { enabled: true, runs: 200 },
  viaIR: false,
  metadata: { bytecodeHash: "ipfs" },
};

function usage(message) {
  process.stderr.write(`${message}\nusage: node contracts/build.js [--check] [--artifacts DIR]\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const args = { check: false, artifacts: DEFAULT_ARTIFACTS };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--check") {
      args.check = true;
    } else if (argv[i] === "--artifacts") {
      if (i + 1 >= argv.length) usage("--artifacts needs a directory");
      args.artifacts = path.resolve(argv[++i]);
    } else {
      usage(`unknown argument: ${argv[i]}`);
    }
  }
  return args;
}

// Maps a source unit name to a file, refusing anything outside contracts/ and OpenZeppelin.
function sourceFile(unitName) {
  if (unitName.includes("..")) return null;
  if (unitName.startsWith("@openzeppelin/contracts/")) return path.join(NODE_MODULES, unitName);
  if (unitName.startsWith("contracts/")) return path.join(ROOT, unitName);
  return null;
}

function findImports(unitName) {
  const file = sourceFile(unitName);
  if (file === null) return { error: `import outside contracts/ and @openzeppelin/: ${unitName}` };
  try {
    return { contents: fs.readFileSync(file, "utf8") };
  } catch (err) {
    return { error: `cannot read ${unitName}: ${err.message}` };
  }
}

function compile() {
  const sources = {};
  for (const unitName of Object.values(CONTRACTS)) {
    sources[unitName] = { content: fs.readFileSync(path.join(ROOT, unitName), "utf8") };
  }
  const input = {
    language: "Solidity",
    sources,
    settings: {
      ...SETTINGS,
      outputSelection: {
        "*": { "*": ["abi", "metadata", "evm.bytecode.object", "evm.deployedBytecode.object"] },
      },
    },
  };
  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
  const problems = output.errors || [];
  for (const problem of problems) {
    process.stderr.write(problem.formattedMessage || `${problem.severity}: ${problem.message}\n`);
  }
  if (problems.some((p) => p.severity === "error")) {
    process.stderr.write("compilation failed\n");
    process.exit(1);
  }
  return output;
}

// sha256 over every source file the contract was compiled from (its import closure), in the
// order of the metadata's sorted source names: it changes exactly when the inputs change.
function sourceHash(metadata) {
  const hash = crypto.createHash("sha256");
  for (const unitName of Object.keys(metadata.sources).sort()) {
    const content = findImports(unitName).contents;
    if (content === undefined) throw new Error(`source vanished during build: ${unitName}`);
    hash.update(`${unitName}\0${content}\0`);
  }
  return `0x${hash.digest("hex")}`;
}

function artifacts(output) {
  const result = {};
  for (const [name, unitName] of Object.entries(CONTRACTS)) {
    const contract = output.contracts[unitName] && output.contracts[unitName][name];
    if (!contract) {
      process.stderr.write(`${unitName} does not define contract ${name}\n`);
      process.exit(1);
    }
    const metadata = JSON.parse(contract.metadata);
    const artifact = {
      contractName: name,
      sourceName: unitName,
      abi: contract.abi,
      bytecode: `0x${contract.evm.bytecode.object}`,
      deployedBytecode: `0x${contract.evm.deployedBytecode.object}`,
      compiler: { version: solc.version(), settings: SETTINGS },
      sourceHash: sourceHash(metadata),
    };
    result[name] = `${JSON.stringify(artifact, null, 2)}\n`;
  }
  return result;
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  const built = artifacts(compile());
  const shown = (file) => path.relative(process.cwd(), file) || file;

  if (args.check) {
    const stale = [];
    for (const [name, text] of Object.entries(built)) {
      const file = path.join(args.artifacts, `${name}.json`);
      let current = null;
      try {
        current = fs.readFileSync(file, "utf8");
      } catch {
        // A missing artifact is stale too.
      }
      if (current !== text) stale.push(shown(file));
    }
    if (stale.length > 0) {
      for (const file of stale) process.stderr.write(`stale artifact: ${file}\n`);
      process.stderr.write("the sources compile to something else: run `node contracts/build.js`\n");
      process.exit(1);
    }
    process.stdout.write(`artifacts up to date (${Object.keys(built).join(", ")})\n`);
    return;
  }

  fs.mkdirSync(args.artifacts, { recursive: true });
  for (const [name, text] of Object.entries(built)) {
    const file = path.join(args.artifacts, `${name}.json`);
    fs.writeFileSync(file, text);
    process.stdout.write(`wrote ${shown(file)}\n`);
  }
}

main();
