#!/usr/bin/env node
// Classify images with an edgekd deploy bundle and onnxruntime-node.
//
//   node classify.js BUNDLE_DIR photo.jpg scan.png [...] [--top 5] [--json] [--logits] [--model model.ort]
//   node classify.js BUNDLE_DIR --eval [--json]        # top-1 on the bundle's eval.npz (already normalized)
//
// BUNDLE_DIR is runs/<name>/deploy: model.onnx (or model.ort), labels.json, preprocess.json, eval.npz.
// Images: JPEG (jpeg-js), PNG (pngjs), binary PPM/PGM; preprocessed as preprocess.json says by preprocess.js
// (EXIF orientation, colour conversion, shorter-side bilinear antialiased resize, center crop, normalize).
// In a browser, decode with preprocess.js's decodeInBrowser(); React Native apps use the same
// InferenceSession/Tensor API from onnxruntime-react-native.
'use strict';

const fs = require('fs');
const path = require('path');
const zlib = require('zlib');
const ort = require('onnxruntime-node');
const contract = require('./preprocess.js');

async function loadBundle(dir, modelFile) {
  const pre = JSON.parse(fs.readFileSync(path.join(dir, 'preprocess.json'), 'utf8'));
  const labels = JSON.parse(fs.readFileSync(path.join(dir, 'labels.json'), 'utf8'));
  // One intra-op thread: predictable latency on phones/boards, and what edgekd's budgets measure.
  const session = await ort.InferenceSession.create(path.join(dir, modelFile || 'model.onnx'),
    { executionProviders: ['cpu'], intraOpNumThreads: 1, graphOptimizationLevel: 'all' });
  return { session, labels, pre };
}

// HWC uint8 pixels (any size; 1 grey, 2 grey+alpha, 3 RGB or 4 RGBA channels, e.g. a camera frame) -> the
// model input, a NCHW Float32Array, exactly as preprocess.json says (see preprocess.js).
function preprocess(pixels, width, height, channels, pre) {
  return contract.decodedToInput({ width, height, channels, data: pixels }, contract.loadPreprocess(pre));
}

// JPEG APP1 "Exif" segment -> orientation (1 when none).
function jpegOrientation(buf) {
  for (let p = 2; p + 4 <= buf.length && buf[p] === 0xff;) {
    const marker = buf[p + 1], len = buf.readUInt16BE(p + 2);
    if (marker === 0xda || marker === 0xd9) break; // start of scan: no more metadata
    if (marker === 0xe1 && buf.toString('latin1', p + 4, p + 8) === 'Exif') return contract.exifOrientation(buf.subarray(p + 4, p + 2 + len));
    p += 2 + len;
  }
  return 1;
}

// PNG eXIf chunk -> orientation (1 when none).
function pngOrientation(buf) {
  for (let p = 8; p + 8 <= buf.length;) {
    const len = buf.readUInt32BE(p), type = buf.toString('latin1', p + 4, p + 8);
    if (type === 'eXIf') return contract.exifOrientation(buf.subarray(p + 8, p + 8 + len));
    if (type === 'IEND') break;
    p += 12 + len;
  }
  return 1;
}

// An image file -> {width, height, channels, data, orientation}. PNG: pngjs (RGBA; 16-bit samples keep the
// high byte); JPEG: jpeg-js (RGBA; its CMYK -> RGB truncates where Pillow rounds, <= 1 level); PPM/PGM.
function decodeImageFile(file) {
  const buf = fs.readFileSync(file);
  if (buf.length >= 8 && buf.readUInt32BE(0) === 0x89504e47) {
    const { PNG } = require('pngjs');
    const png = PNG.sync.read(buf, { skipRescale: true });
    const data = png.depth === 16 ? Uint8Array.from(png.data, (v) => v >> 8) : new Uint8Array(png.data.buffer, png.data.byteOffset, png.data.length);
    return { width: png.width, height: png.height, channels: 4, data, orientation: pngOrientation(buf) };
  }
  if (buf.length >= 3 && buf[0] === 0xff && buf[1] === 0xd8 && buf[2] === 0xff) {
    const jpeg = require('jpeg-js');
    const img = jpeg.decode(buf, { useTArray: true, formatAsRGBA: true, maxResolutionInMP: 200 });
    return { width: img.width, height: img.height, channels: 4, data: img.data, orientation: jpegOrientation(buf) };
  }
  if (buf[0] === 0x50 && (buf[1] === 0x36 || buf[1] === 0x35)) {
    const img = readPnm(file);
    return { ...img, data: img.pixels, orientation: 1 };
  }
  throw new Error(`${file}: not a JPEG, PNG or binary PPM/PGM file`);
}

function imageToInput(file, pre) {
  return contract.decodedToInput(decodeImageFile(file), contract.loadPreprocess(pre));
}

function readPnm(file) {
  const buf = fs.readFileSync(file);
  const tokens = [];
  let i = 0;
  while (tokens.length < 4) { // magic, width, height, maxval; '#' starts a comment
    while (/\s/.test(String.fromCharCode(buf[i]))) i++;
    if (buf[i] === 0x23) { while (buf[i] !== 0x0a) i++; continue; }
    let t = '';
    while (i < buf.length && !/\s/.test(String.fromCharCode(buf[i]))) t += String.fromCharCode(buf[i++]);
    tokens.push(t);
  }
  const [magic, w, h, maxval] = [tokens[0], +tokens[1], +tokens[2], +tokens[3]];
  if ((magic !== 'P6' && magic !== 'P5') || maxval !== 255) throw new Error(`${file}: need binary 8-bit P6/P5`);
  const channels = magic === 'P6' ? 3 : 1;
  return { width: w, height: h, channels, pixels: buf.subarray(i + 1, i + 1 + w * h * channels) };
}

// Minimal .npz reader (zip of .npy files, stored or deflated, zip64 aware) for eval.npz.
function readNpz(file) {
  const buf = fs.readFileSync(file);
  let eocd = buf.length - 22;
  while (eocd >= 0 && buf.readUInt32LE(eocd) !== 0x06054b50) eocd--;
  if (eocd < 0) throw new Error(`${file}: not a zip/npz file`);
  let count = buf.readUInt16LE(eocd + 10), p = buf.readUInt32LE(eocd + 16);
  const arrays = {};
  for (; count > 0; count--) {
    const method = buf.readUInt16LE(p + 10), nameLen = buf.readUInt16LE(p + 28);
    const extraLen = buf.readUInt16LE(p + 30), commentLen = buf.readUInt16LE(p + 32);
    let csize = buf.readUInt32LE(p + 20), usize = buf.readUInt32LE(p + 24), offset = buf.readUInt32LE(p + 42);
    const name = buf.toString('utf8', p + 46, p + 46 + nameLen);
    for (let e = p + 46 + nameLen; e < p + 46 + nameLen + extraLen;) { // zip64 extra: 8-byte fields as needed
      const id = buf.readUInt16LE(e), size = buf.readUInt16LE(e + 2);
      let q = e + 4;
      if (id === 1) {
        if (usize === 0xffffffff) { usize = Number(buf.readBigUInt64LE(q)); q += 8; }
        if (csize === 0xffffffff) { csize = Number(buf.readBigUInt64LE(q)); q += 8; }
        if (offset === 0xffffffff) offset = Number(buf.readBigUInt64LE(q));
      }
      e += 4 + size;
    }
    const start = offset + 30 + buf.readUInt16LE(offset + 26) + buf.readUInt16LE(offset + 28);
    const raw = buf.subarray(start, start + csize);
    arrays[name.replace(/\.npy$/, '')] = parseNpy(method === 8 ? zlib.inflateRawSync(raw) : raw);
    p += 46 + nameLen + extraLen + commentLen;
  }
  return arrays;
}

function parseNpy(buf) {
  const major = buf[6];
  const headerLen = major === 1 ? buf.readUInt16LE(8) : buf.readUInt32LE(8);
  const dataStart = (major === 1 ? 10 : 12) + headerLen;
  const header = buf.toString('latin1', major === 1 ? 10 : 12, dataStart);
  const descr = /'descr':\s*'([^']+)'/.exec(header)[1];
  const shape = /'shape':\s*\(([^)]*)\)/.exec(header)[1].split(',').filter((s) => s.trim()).map(Number);
  if (/'fortran_order':\s*True/.test(header)) throw new Error('fortran-order arrays are not supported');
  const bytes = Uint8Array.prototype.slice.call(buf, dataStart).buffer; // copy: typed arrays need alignment
  const types = { '<f4': Float32Array, '<i8': BigInt64Array, '<i4': Int32Array, '|u1': Uint8Array };
  if (!types[descr]) throw new Error(`unsupported npy dtype ${descr}`);
  let data = new types[descr](bytes);
  if (descr === '<i8') data = Array.from(data, Number);
  return { shape, data };
}

function softmax(logits) {
  const m = Math.max(...logits);
  const e = Array.from(logits, (v) => Math.exp(v - m));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / s);
}

function topK(logits, k, labels) {
  const probs = softmax(logits);
  return probs.map((p, i) => ({ index: i, label: labels[i] ?? String(i), prob: p }))
    .sort((a, b) => b.prob - a.prob).slice(0, k);
}

// Runs N samples (a float32 NCHW buffer) through the model in batches of up to 64 (the batch axis is dynamic).
async function logitsFor(bundle, input, n) {
  const { session, pre } = bundle;
  const per = pre.channels * pre.height * pre.width, out = [];
  for (let i = 0; i < n; i += 64) {
    const b = Math.min(64, n - i);
    const tensor = new ort.Tensor('float32', input.subarray(i * per, (i + b) * per), [b, pre.channels, pre.height, pre.width]);
    const result = await session.run({ [pre.input_name || session.inputNames[0]]: tensor });
    const logits = result[pre.output_name || session.outputNames[0]];
    const classes = logits.dims[1];
    for (let j = 0; j < b; j++) out.push(logits.data.subarray(j * classes, (j + 1) * classes));
  }
  return out;
}

async function main(argv) {
  const opts = { top: 5, json: false, eval: false, logits: false, model: undefined, files: [] };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--top') opts.top = Number(argv[++i]);
    else if (argv[i] === '--logits') opts.logits = true;
    else if (argv[i] === '--model') opts.model = argv[++i];
    else if (argv[i] === '--json') opts.json = true;
    else if (argv[i] === '--eval') opts.eval = true;
    else opts.files.push(argv[i]);
  }
  const [dir, ...images] = opts.files;
  if (!dir || (!opts.eval && images.length === 0)) {
    console.error('usage: node classify.js BUNDLE_DIR (IMAGE.jpg|.png|.ppm ... | --eval) [--top K] [--json] [--logits] [--model model.ort]');
    return 2;
  }
  const bundle = await loadBundle(dir, opts.model);
  if (opts.eval) {
    const { inputs, labels } = readNpz(path.join(dir, 'eval.npz'));
    const logits = await logitsFor(bundle, inputs.data, inputs.shape[0]);
    const top1 = logits.map((l) => topK(l, 1, bundle.labels)[0].index);
    const accuracy = labels ? top1.filter((t, i) => t === labels.data[i]).length / top1.length : null;
    if (opts.json) console.log(JSON.stringify({ samples: top1.length, accuracy, top1 }));
    else console.log(`${top1.length} samples, top-1 accuracy ${accuracy === null ? 'n/a' : accuracy.toFixed(4)}`);
    return 0;
  }
  const results = [];
  for (const file of images) {
    const [logits] = await logitsFor(bundle, imageToInput(file, bundle.pre), 1);
    const result = { file, top: topK(logits, opts.top, bundle.labels) };
    if (opts.logits) result.logits = Array.from(logits);
    results.push(result);
  }
  if (opts.json) console.log(JSON.stringify(results));
  else for (const r of results) {
    console.log(r.file);
    for (const t of r.top) console.log(`  ${t.label.padEnd(20)} ${(100 * t.prob).toFixed(1).padStart(5)}%  (class ${t.index})`);
  }
  return 0;
}

module.exports = { loadBundle, preprocess, imageToInput, decodeImageFile, readPnm, readNpz, topK, softmax, logitsFor };

if (require.main === module) {
  main(process.argv.slice(2)).then((code) => { process.exitCode = code; },
    (err) => { console.error(`error: ${err.message}`); process.exitCode = 1; });
}
