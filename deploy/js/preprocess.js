// edgekd's preprocessing contract (preprocess.json, format edgekd-preprocess/2) in plain JavaScript:
// decoded image -> model input. No dependencies and no Node/DOM API: the same file runs in Node, a browser
// (a <script> tag defines `edgekdPreprocess`) and React Native.
//
// The steps match what edgekd's eval path does with Pillow, so identical decoded pixels give identical inputs:
//   1. EXIF orientation applied (exifOrientation/applyOrientation; browsers' decoders do it themselves);
//      colour conversion as Pillow's convert(): alpha dropped (not composited), grey -> RGB replicated,
//      RGB -> L = (19595 R + 38470 G + 7471 B + 32768) >> 16; 16-bit samples keep the high byte (>> 8).
//   2. resize: shorter side to `resize` (longer side = Math.trunc(resize * long / short)), or straight to
//      width x height when `resize` is null, with Pillow's bilinear resampling: a triangle filter whose support
//      grows with the reduction factor (antialiasing), two separable passes in Pillow's order, 8-bit fixed point.
//   3. center crop [h, w]: top = round((H - h) / 2), left = round((W - w) / 2), halves rounded to even.
//   4. x = (pixel * scale - mean[c]) / std[c] -> NCHW Float32Array.
(function (root, factory) {
  if (typeof module === 'object' && module.exports) module.exports = factory();
  else root.edgekdPreprocess = factory();
}(typeof self !== 'undefined' ? self : this, function () {
  'use strict';

  const FORMAT = 'edgekd-preprocess/2';
  const PRECISION_BITS = 32 - 8 - 2;

  // preprocess.json (new or earlier format) -> completed fields; the earlier format has no resize or crop.
  function loadPreprocess(raw) {
    if (raw.format !== undefined && raw.format !== FORMAT) {
      throw new Error(`preprocess.json format ${raw.format} is not supported (${FORMAT})`);
    }
    const channels = raw.channels;
    const color = raw.color || (channels === 1 ? 'L' : 'RGB');
    if (!((color === 'L' && channels === 1) || (color === 'RGB' && channels === 3))) {
      throw new Error(`preprocess.json: color ${color} with ${channels} channels is not supported (RGB/3 or L/1)`);
    }
    const crop = raw.crop == null ? null : (Array.isArray(raw.crop) ? raw.crop : [raw.crop, raw.crop]);
    return {
      format: FORMAT, inputName: raw.input_name || 'input', outputName: raw.output_name || 'logits',
      color, channels, resize: raw.resize == null ? null : raw.resize, crop,
      height: raw.height, width: raw.width, scale: raw.scale ?? 1 / 255, mean: raw.mean, std: raw.std,
    };
  }

  // Orientation (EXIF tag 0x0112) from a TIFF-structured EXIF block, "Exif\0\0" prefix optional; 1 if absent.
  function exifOrientation(bytes) {
    let p = 0;
    if (bytes.length >= 6 && bytes[0] === 0x45 && bytes[1] === 0x78 && bytes[2] === 0x69 && bytes[3] === 0x66) p = 6;
    if (bytes.length < p + 8) return 1;
    const le = bytes[p] === 0x49 && bytes[p + 1] === 0x49;
    if (!le && !(bytes[p] === 0x4d && bytes[p + 1] === 0x4d)) return 1;
    const u16 = (o) => (o + 2 > bytes.length - p ? 0
      : le ? bytes[p + o] | (bytes[p + o + 1] << 8) : (bytes[p + o] << 8) | bytes[p + o + 1]);
    const u32 = (o) => (le ? u16(o) + u16(o + 2) * 65536 : u16(o) * 65536 + u16(o + 2));
    const ifd = u32(4), entries = u16(ifd);
    for (let i = 0; i < entries; i++) {
      const e = ifd + 2 + 12 * i;
      if (u16(e) === 0x0112 && u16(e + 2) === 3) {
        const v = u16(e + 8);
        return v >= 1 && v <= 8 ? v : 1;
      }
    }
    return 1;
  }

  // Pillow's ImageOps.exif_transpose: 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise,
  // 7 transverse, 8 rotate 90 counter-clockwise. img: {width, height, channels, data}.
  function applyOrientation(img, orientation) {
    if (!(orientation >= 2 && orientation <= 8)) return img;
    const { width: W, height: H, channels: C } = img;
    const swap = orientation >= 5, ow = swap ? H : W, oh = swap ? W : H;
    const out = new Uint8Array(ow * oh * C);
    for (let y = 0; y < oh; y++) {
      for (let x = 0; x < ow; x++) {
        let sx = x, sy = y;
        switch (orientation) {
          case 2: sx = W - 1 - x; break;
          case 3: sx = W - 1 - x; sy = H - 1 - y; break;
          case 4: sy = H - 1 - y; break;
          case 5: sx = y; sy = x; break;
          case 6: sx = y; sy = H - 1 - x; break;
          case 7: sx = W - 1 - y; sy = H - 1 - x; break;
          case 8: sx = W - 1 - y; sy = x; break;
        }
        for (let c = 0; c < C; c++) out[(y * ow + x) * C + c] = img.data[(sy * W + sx) * C + c];
      }
    }
    return { ...img, width: ow, height: oh, data: out };
  }

  // Decoded samples -> Pillow's convert(color). img.channels: 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA (or CMYK
  // ink values when img.cmyk). Returns {width, height, channels: 1|3, data: Uint8Array}.
  function convertColor(img, color) {
    const n = img.width * img.height, inC = img.channels, outC = color === 'L' ? 1 : 3;
    const out = new Uint8Array(n * outC), d = img.data;
    for (let i = 0; i < n; i++) {
      const p = i * inC;
      let r, g, b;
      if (img.cmyk) {
        const nk = 255 - d[p + 3];
        const ink = (c) => { const t = c * nk + 128; return Math.min(255, Math.max(0, nk - (((t >> 8) + t) >> 8))); };
        r = ink(d[p]); g = ink(d[p + 1]); b = ink(d[p + 2]);
      } else if (inC <= 2) {
        r = g = b = d[p];
      } else {
        r = d[p]; g = d[p + 1]; b = d[p + 2];
      }
      if (outC === 1) out[i] = (inC <= 2 && !img.cmyk) ? d[p] : (r * 19595 + g * 38470 + b * 7471 + 0x8000) >>> 16;
      else { out[i * 3] = r; out[i * 3 + 1] = g; out[i * 3 + 2] = b; }
    }
    return { width: img.width, height: img.height, channels: outC, data: out };
  }

  // Pillow's bilinear taps for one axis: triangle filter of support 1 stretched by the reduction factor,
  // weights normalized to sum 1, then rounded to fixed point with PRECISION_BITS.
  function bilinearTaps(inSize, outSize) {
    const scale = inSize / outSize, filterscale = Math.max(scale, 1.0), support = filterscale;
    const ss = 1.0 / filterscale;
    const ksize = Math.ceil(support) * 2 + 1;
    const first = new Int32Array(outSize), count = new Int32Array(outSize), weights = new Int32Array(outSize * ksize);
    const w = new Float64Array(ksize);
    for (let xx = 0; xx < outSize; xx++) {
      const center = (xx + 0.5) * scale;
      let xmin = Math.trunc(center - support + 0.5);
      if (xmin < 0) xmin = 0;
      let xmax = Math.trunc(center + support + 0.5);
      if (xmax > inSize) xmax = inSize;
      xmax -= xmin;
      let total = 0;
      for (let x = 0; x < xmax; x++) {
        const dist = Math.abs((x + xmin - center + 0.5) * ss);
        w[x] = dist < 1.0 ? 1.0 - dist : 0.0;
        total += w[x];
      }
      for (let x = 0; x < xmax; x++) {
        const v = total !== 0 ? w[x] / total : w[x];
        weights[xx * ksize + x] = Math.trunc(v < 0 ? -0.5 + v * (1 << PRECISION_BITS) : 0.5 + v * (1 << PRECISION_BITS));
      }
      first[xx] = xmin;
      count[xx] = xmax;
    }
    return { ksize, first, count, weights };
  }

  const clip8 = (acc) => { const v = acc >> PRECISION_BITS; return v < 0 ? 0 : v > 255 ? 255 : v; };

  // One pass of Pillow's bilinear resampling along x (horizontal) or y, rounding to 8 bits as Pillow does.
  function resampleAxis(img, outSize, horizontal) {
    const { width: W, height: H, channels: C } = img;
    const t = bilinearTaps(horizontal ? W : H, outSize);
    const ow = horizontal ? outSize : W, oh = horizontal ? H : outSize, out = new Uint8Array(ow * oh * C);
    const step = horizontal ? C : W * C;  // between taps: the next pixel along x, or the next row
    for (let y = 0; y < oh; y++) {
      for (let x = 0; x < ow; x++) {
        const o = horizontal ? x : y, k = o * t.ksize, n = t.count[o];
        const first = horizontal ? (y * W + t.first[o]) * C : (t.first[o] * W + x) * C;
        for (let c = 0; c < C; c++) {
          let acc = 1 << (PRECISION_BITS - 1);
          for (let i = 0; i < n; i++) acc += img.data[first + i * step + c] * t.weights[k + i];
          out[(y * ow + x) * C + c] = clip8(acc);
        }
      }
    }
    return { width: ow, height: oh, channels: C, data: out };
  }

  // Pillow's Image.resize(size, BILINEAR) on 8-bit grey or RGB: two passes, each rounded to 8 bits. Pillow runs
  // the horizontal pass first, except (Pillow >= 13) when the height shrinks by more than twice as many pixels
  // as the width does: then the vertical pass goes first. A size that does not change skips its pass.
  function resizeBilinear(img, outW, outH) {
    const { width: W, height: H } = img;
    if (outW !== W && outH < H && H - outH > 2 * (W - outW)) return resampleAxis(resampleAxis(img, outH, false), outW, true);
    const cur = outW !== W ? resampleAxis(img, outW, true) : img;
    return outH !== H ? resampleAxis(cur, outH, false) : cur;
  }

  const roundHalfEven = (v) => { const f = Math.floor(v); return v - f === 0.5 ? (f % 2 === 0 ? f : f + 1) : Math.round(v); };

  // Steps 2-3: resized (and cropped) pixels of the model's height x width.
  function resizeAndCrop(img, pre) {
    let w = pre.width, h = pre.height;
    if (pre.resize !== null) {
      const short = Math.min(img.width, img.height), long = Math.max(img.width, img.height);
      const newLong = Math.trunc((pre.resize * long) / short);  // int(resize * long / short), in doubles
      [w, h] = img.width <= img.height ? [pre.resize, newLong] : [newLong, pre.resize];
    }
    let out = resizeBilinear(img, w, h);
    if (pre.crop) {
      const [ch, cw] = pre.crop;
      if (ch > out.height || cw > out.width) throw new Error(`crop ${ch}x${cw} is larger than the resized image ${out.height}x${out.width}`);
      const top = roundHalfEven((out.height - ch) / 2), left = roundHalfEven((out.width - cw) / 2), C = out.channels;
      const data = new Uint8Array(ch * cw * C);
      for (let y = 0; y < ch; y++) data.set(out.data.subarray(((top + y) * out.width + left) * C, ((top + y) * out.width + left + cw) * C), y * cw * C);
      out = { width: cw, height: ch, channels: C, data };
    }
    if (out.width !== pre.width || out.height !== pre.height) {
      throw new Error(`preprocessing gives ${out.height}x${out.width}, the model takes ${pre.height}x${pre.width}`);
    }
    return out;
  }

  // Step 4: HWC uint8 -> NCHW Float32Array, in float32 arithmetic as edgekd computes it.
  function normalize(img, pre) {
    const { width: W, height: H, channels: C } = img, plane = W * H, out = new Float32Array(C * plane);
    const f = Math.fround, scale = f(pre.scale);
    for (let c = 0; c < C; c++) {
      const mean = f(pre.mean[c]), std = f(pre.std[c]);
      for (let i = 0; i < plane; i++) out[c * plane + i] = f(f(f(img.data[i * C + c] * scale) - mean) / std);
    }
    return out;
  }

  // A decoded image ({width, height, channels, data, cmyk?, orientation?}) -> the model input (Float32Array).
  function decodedToInput(img, pre) {
    const oriented = applyOrientation(img, img.orientation || 1);
    return normalize(resizeAndCrop(convertColor(oriented, pre.color), pre), pre);
  }

  // Browser decoding: a Blob/File -> decoded RGBA pixels with no colour-space conversion and no alpha
  // premultiplication requested; the browser applies the EXIF orientation itself. Canvas storage is
  // premultiplied, so pixels with alpha < 255 can come back a level or two off (alpha itself is dropped).
  async function decodeInBrowser(blob) {
    const bitmap = await createImageBitmap(blob, { colorSpaceConversion: 'none', premultiplyAlpha: 'none', imageOrientation: 'from-image' });
    const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
    const ctx = canvas.getContext('2d', { colorSpace: 'srgb', willReadFrequently: true });
    ctx.drawImage(bitmap, 0, 0);
    const { data } = ctx.getImageData(0, 0, bitmap.width, bitmap.height);
    return { width: bitmap.width, height: bitmap.height, channels: 4, data: new Uint8Array(data.buffer) };
  }

  return { FORMAT, loadPreprocess, exifOrientation, applyOrientation, convertColor, bilinearTaps, resizeBilinear,
           resizeAndCrop, normalize, decodedToInput, decodeInBrowser, roundHalfEven };
}));
