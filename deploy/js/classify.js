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

// JPEG frame header: components with their sampling factors, and whether an Adobe APP14 marker is present.
function jpegLayout(buf) {
  let adobe = false;
  for (let p = 2; p + 4 <= buf.length && buf[p] === 0xff;) {
    const marker = buf[p + 1], len = buf.readUInt16BE(p + 2);
    if (marker === 0xee && buf.toString('latin1', p + 4, p + 9) === 'Adobe') adobe = true;
    if (marker >= 0xc0 && marker <= 0xcf && marker !== 0xc4 && marker !== 0xc8 && marker !== 0xcc) {
      const components = [];
      for (let i = 0; i < buf[p + 9]; i++) {
        const f = buf[p + 11 + 3 * i];
        components.push({ h: f >> 4, v: f & 15 });
      }
      return { components, adobe };
    }
    if (marker === 0xda) break;
    p += 2 + len;
  }
  return { components: [], adobe };
}

// libjpeg's "fancy" (triangle) chroma upsampling, by 2 horizontally (h2v1) or in both directions (h2v2), of a
// plane of dw x dh samples -> 2dw x (2dh | dh), edges replicated as libjpeg does.
function fancyUpsample(plane, dw, dh, twoRows) {
  const ow = 2 * dw, oh = twoRows ? 2 * dh : dh, out = new Uint8Array(ow * oh);
  const at = (x, y) => plane[Math.min(dh - 1, Math.max(0, y)) * dw + Math.min(dw - 1, Math.max(0, x))];
  for (let oy = 0; oy < oh; oy++) {
    const y = twoRows ? oy >> 1 : oy, near = twoRows ? (oy & 1 ? y + 1 : y - 1) : y;
    const col = (x) => (twoRows ? at(x, y) * 3 + at(x, near) : at(x, y));
    const [shift, first, last, biasA, biasB] = twoRows ? [4, 4, 4, 8, 7] : [2, 1, 1, 1, 2];
    for (let x = 0; x < dw; x++) {
      const here = col(x) * 3;
      out[oy * ow + 2 * x] = x === 0 ? (twoRows ? (col(0) * first + 8) >> shift : col(0))
        : (here + col(x - 1) + biasA) >> shift;
      out[oy * ow + 2 * x + 1] = x === dw - 1 ? (twoRows ? (col(x) * last + 7) >> shift : col(x))
        : (here + col(x + 1) + biasB) >> shift;
    }
  }
  return out;
}

// JPEG -> RGBA / grey with jpeg-js doing the entropy decoding and IDCT, and the chroma upsampling and
// YCbCr -> RGB conversion done here the way libjpeg (and so Pillow) does them: jpeg-js alone replicates chroma
// samples and truncates its floating-point colour conversion, a few levels off Pillow. Layouts other than
// 4:4:4 / 4:2:2 / 4:2:0 YCbCr (and CMYK: jpeg-js's CMYK -> RGB truncates, <= 1 level) use jpeg-js's output.
function decodeJpeg(buf) {
  const jpeg = require('jpeg-js');
  const { components, adobe } = jpegLayout(buf);
  const hmax = Math.max(...components.map((c) => c.h)), vmax = Math.max(...components.map((c) => c.v));
  const simple = components.length === 3 && !adobe && components[0].h === hmax && components[0].v === vmax &&
    components.slice(1).every((c) => c.h === components[1].h && c.v === components[1].v && hmax / c.h <= 2 &&
      (vmax / c.v === 1 || (vmax / c.v === 2 && hmax / c.h === 2)));
  if (!simple) {
    const img = jpeg.decode(buf, { useTArray: true, formatAsRGBA: true, maxResolutionInMP: 200 });
    return { width: img.width, height: img.height, channels: 4, data: img.data };
  }
  const raw = jpeg.decode(buf, { useTArray: true, formatAsRGBA: false, colorTransform: false, maxResolutionInMP: 200 });
  const { width: w, height: h } = raw, sx = hmax / components[1].h, sy = vmax / components[1].v;
  const dw = Math.ceil(w / sx), dh = Math.ceil(h / sy);
  const chroma = [1, 2].map((k) => {
    if (sx === 1) return null;
    const plane = new Uint8Array(dw * dh);  // jpeg-js replicated each sample: take one per block
    for (let y = 0; y < dh; y++) for (let x = 0; x < dw; x++) plane[y * dw + x] = raw.data[((y * sy) * w + x * sx) * 3 + k];
    return fancyUpsample(plane, dw, dh, sy === 2);
  });
  const cw = 2 * dw, fix = (v) => Math.trunc(v * 65536 + 0.5), half = 1 << 15;
  const data = new Uint8Array(w * h * 4);
  const clamp = (v) => (v < 0 ? 0 : v > 255 ? 255 : v);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const i = y * w + x, Y = raw.data[i * 3];
      const cb = (chroma[0] ? chroma[0][y * cw + x] : raw.data[i * 3 + 1]) - 128;
      const cr = (chroma[1] ? chroma[1][y * cw + x] : raw.data[i * 3 + 2]) - 128;
      data[i * 4] = clamp(Y + ((fix(1.402) * cr + half) >> 16));
      data[i * 4 + 1] = clamp(Y + ((-fix(0.34414) * cb + half - fix(0.71414) * cr) >> 16));
      data[i * 4 + 2] = clamp(Y + ((fix(1.772) * cb + half) >> 16));
      data[i * 4 + 3] = 255;
    }
  }
  return { width: w, height: h, channels: 4, data };
}

// An image file -> {width, height, channels, data, orientation}. PNG: pngjs (RGBA; 16-bit samples keep the
// high byte); JPEG: decodeJpeg (jpeg-js + libjpeg's upsampling and colour conversion); PPM/PGM.
function decodeImageFile(file) {
  const buf = fs.readFileSync(file);
  if (buf.length >= 8 && buf.readUInt32BE(0) === 0x89504e47) {
    const { PNG } = require('pngjs');
    const png = PNG.sync.read(buf, { skipRescale: true });
    const data = png.depth === 16 ? Uint8Array.from(png.data, (v) => v >> 8) : new Uint8Array(png.data.buffer, png.data.byteOffset, png.data.length);
    return { width: png.width, height: png.height, channels: 4, data, orientation: pngOrientation(buf) };
  }
  if (buf.length >= 3 && buf[0] === 0xff && buf[1] === 0xd8 && buf[2] === 0xff) {
    return { ...decodeJpeg(buf), orientation: jpegOrientation(buf) };
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
