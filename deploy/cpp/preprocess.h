// edgekd's preprocessing contract (preprocess.json, format edgekd-preprocess/2) in C++: image file -> model input.
//
// Needs libjpeg (libjpeg-turbo) and libpng; nothing of ONNX Runtime. The steps, each matching what edgekd's
// eval path does with Pillow, so a PNG gives the same input bit for bit (JPEG too with libjpeg-turbo's default
// decoder settings, which Pillow uses):
//   1. decode; apply the EXIF orientation (JPEG APP1 / PNG eXIf); 16-bit samples keep the high byte (>> 8);
//      convert to the model's colour as Pillow's convert() does: alpha dropped (not composited), palette
//      expanded, grey -> RGB replicated, RGB -> L = (19595 R + 38470 G + 7471 B + 32768) >> 16,
//      CMYK (stored inverted, Adobe convention) -> RGB = (255 - K) - (C * (255 - K)) / 255 rounded.
//   2. resize: shorter side to `resize` (longer side = int(resize * long / short)), or straight to
//      width x height when `resize` is null; Pillow's bilinear resampling (a triangle filter whose support grows
//      with the reduction factor: antialiasing), two separable passes in Pillow's order, 8-bit fixed point.
//   3. center crop [h, w]: top = round((H - h) / 2), left = round((W - w) / 2), halves rounded to even.
//   4. x = (pixel * scale - mean[c]) / std[c], float32 NCHW.
#pragma once

#if EDGEKD_IMAGE_DECODERS  // set by CMakeLists.txt when libjpeg and libpng are found
#include <jpeglib.h>
#include <png.h>
#endif

#include <algorithm>
#include <cmath>
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

namespace edgekd {

struct Pixels {  // interleaved 8-bit samples, row-major
  int width = 0, height = 0, channels = 0;  // 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA or CMYK
  bool cmyk = false;
  std::vector<uint8_t> data;
};

struct Preprocess {
  std::string color = "RGB";   // "RGB" or "L"
  int resize = 0;              // 0: null (resize straight to height x width)
  int crop_h = 0, crop_w = 0;  // 0: no crop
  int height = 0, width = 0;
  double scale = 1.0 / 255;
  std::vector<double> mean, std;
};

// ------------------------------------------------------------------ EXIF orientation

// The Orientation tag (0x0112) of a TIFF-structured EXIF block ("Exif\0\0" prefix optional); 1 when absent.
inline int exif_orientation(const uint8_t* p, size_t n) {
  if (n >= 6 && std::equal(p, p + 6, reinterpret_cast<const uint8_t*>("Exif\0\0"))) { p += 6; n -= 6; }
  if (n < 8) return 1;
  const bool le = p[0] == 'I' && p[1] == 'I';
  if (!le && !(p[0] == 'M' && p[1] == 'M')) return 1;
  auto u16 = [&](size_t o) { return o + 2 > n ? 0u : le ? p[o] | (p[o + 1] << 8u) : (p[o] << 8u) | p[o + 1]; };
  auto u32 = [&](size_t o) { return o + 4 > n ? 0u : le ? u16(o) | (u16(o + 2) << 16u) : (u16(o) << 16u) | u16(o + 2); };
  const size_t ifd = u32(4);
  const unsigned entries = u16(ifd);
  for (unsigned i = 0; i < entries; ++i) {
    const size_t e = ifd + 2 + 12 * i;
    if (e + 12 > n) break;
    if (u16(e) == 0x0112 && u16(e + 2) == 3) {  // SHORT
      const unsigned v = u16(e + 8);
      return v >= 1 && v <= 8 ? static_cast<int>(v) : 1;
    }
  }
  return 1;
}

// Pillow's ImageOps.exif_transpose: 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise,
// 7 transverse, 8 rotate 90 counter-clockwise.
inline Pixels apply_orientation(const Pixels& in, int orientation) {
  if (orientation <= 1 || orientation > 8) return in;
  const int W = in.width, H = in.height, C = in.channels;
  const bool swap = orientation >= 5;
  Pixels out = in;
  out.width = swap ? H : W;
  out.height = swap ? W : H;
  for (int y = 0; y < out.height; ++y)
    for (int x = 0; x < out.width; ++x) {
      int sx = x, sy = y;  // source pixel of output (x, y)
      switch (orientation) {
        case 2: sx = W - 1 - x; break;
        case 3: sx = W - 1 - x; sy = H - 1 - y; break;
        case 4: sy = H - 1 - y; break;
        case 5: sx = y; sy = x; break;
        case 6: sx = y; sy = H - 1 - x; break;
        case 7: sx = W - 1 - y; sy = H - 1 - x; break;
        case 8: sx = W - 1 - y; sy = x; break;
      }
      std::copy_n(&in.data[(static_cast<size_t>(sy) * W + sx) * C], C, &out.data[(static_cast<size_t>(y) * out.width + x) * C]);
    }
  return out;
}

// ------------------------------------------------------------------ decoding

#if EDGEKD_IMAGE_DECODERS
namespace detail {
struct JpegError {
  jpeg_error_mgr mgr;
  jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};
inline void jpeg_error_exit(j_common_ptr info) {
  auto* err = reinterpret_cast<JpegError*>(info->err);
  info->err->format_message(info, err->message);
  longjmp(err->jump, 1);
}
}  // namespace detail

inline Pixels decode_jpeg(const std::string& path, const std::vector<uint8_t>& bytes) {
  jpeg_decompress_struct info;
  detail::JpegError err;
  info.err = jpeg_std_error(&err.mgr);
  err.mgr.error_exit = detail::jpeg_error_exit;
  Pixels px;
  int orientation = 1;
  if (setjmp(err.jump)) {
    jpeg_destroy_decompress(&info);
    throw std::runtime_error(path + ": bad JPEG (" + err.message + ")");
  }
  jpeg_create_decompress(&info);
  jpeg_mem_src(&info, bytes.data(), static_cast<unsigned long>(bytes.size()));
  jpeg_save_markers(&info, JPEG_APP0 + 1, 0xFFFF);
  jpeg_read_header(&info, TRUE);
  for (jpeg_saved_marker_ptr m = info.marker_list; m; m = m->next)
    if (m->marker == JPEG_APP0 + 1 && m->data_length >= 6 && std::equal(m->data, m->data + 4, "Exif")) {
      orientation = exif_orientation(m->data, m->data_length);
      break;
    }
  // Library defaults otherwise (accurate integer IDCT, fancy upsampling), as Pillow decodes.
  if (info.num_components == 4) {
    info.out_color_space = JCS_CMYK;
    px.cmyk = true;
  } else if (info.num_components == 1) {
    info.out_color_space = JCS_GRAYSCALE;
  } else {
    info.out_color_space = JCS_RGB;
  }
  jpeg_start_decompress(&info);
  px.width = static_cast<int>(info.output_width);
  px.height = static_cast<int>(info.output_height);
  px.channels = info.output_components;
  px.data.resize(static_cast<size_t>(px.width) * px.height * px.channels);
  while (info.output_scanline < info.output_height) {
    JSAMPROW row = &px.data[static_cast<size_t>(info.output_scanline) * px.width * px.channels];
    jpeg_read_scanlines(&info, &row, 1);
  }
  jpeg_finish_decompress(&info);
  jpeg_destroy_decompress(&info);
  if (px.cmyk)  // Adobe CMYK JPEGs store inverted samples; Pillow always reads them that way ("CMYK;I")
    for (auto& v : px.data) v = static_cast<uint8_t>(255 - v);
  return apply_orientation(px, orientation);
}

namespace detail {
struct PngSource {
  const std::vector<uint8_t>* bytes;
  size_t pos;
};
inline void png_read_bytes(png_structp png, png_bytep out, png_size_t n) {
  auto* src = static_cast<PngSource*>(png_get_io_ptr(png));
  if (src->pos + n > src->bytes->size()) png_error(png, "truncated file");
  std::copy_n(src->bytes->data() + src->pos, n, out);
  src->pos += n;
}
[[noreturn]] inline void png_fail(png_structp png, png_const_charp message) {
  auto* text = static_cast<std::string*>(png_get_error_ptr(png));
  *text = message;
  png_longjmp(png, 1);
}
}  // namespace detail

inline Pixels decode_png(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::string message;
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &message, detail::png_fail, nullptr);
  png_infop info = png ? png_create_info_struct(png) : nullptr;
  if (!info) throw std::runtime_error("libpng: out of memory");
  detail::PngSource src{&bytes, 0};
  Pixels px;
  std::vector<png_bytep> rows;
  if (setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, nullptr);
    throw std::runtime_error(path + ": bad PNG (" + message + ")");
  }
  png_set_read_fn(png, &src, detail::png_read_bytes);
  png_read_info(png, info);
  png_set_expand(png);    // palette -> RGB, grey 1/2/4-bit -> 8-bit (scaled as Pillow does), tRNS -> alpha
  png_set_strip_16(png);  // 16-bit -> 8-bit by keeping the high byte (>> 8), as the contract says
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
  px.width = static_cast<int>(png_get_image_width(png, info));
  px.height = static_cast<int>(png_get_image_height(png, info));
  px.channels = png_get_channels(png, info);
  px.data.resize(static_cast<size_t>(px.width) * px.height * px.channels);
  for (int y = 0; y < px.height; ++y) rows.push_back(&px.data[static_cast<size_t>(y) * px.width * px.channels]);
  png_read_image(png, rows.data());
  png_read_end(png, info);  // an eXIf chunk may follow the image data
  int orientation = 1;
#ifdef PNG_eXIf_SUPPORTED
  png_uint_32 exif_size = 0;
  png_bytep exif = nullptr;
  if (png_get_eXIf_1(png, info, &exif_size, &exif) && exif) orientation = exif_orientation(exif, exif_size);
#endif
  png_destroy_read_struct(&png, &info, nullptr);
  return apply_orientation(px, orientation);
}

inline Pixels decode_image(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw std::runtime_error("cannot read " + path);
  std::vector<uint8_t> bytes;
  uint8_t buf[65536];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, f)) > 0;) bytes.insert(bytes.end(), buf, buf + n);
  std::fclose(f);
  if (bytes.size() >= 3 && bytes[0] == 0xFF && bytes[1] == 0xD8 && bytes[2] == 0xFF) return decode_jpeg(path, bytes);
  if (bytes.size() >= 8 && png_sig_cmp(bytes.data(), 0, 8) == 0) return decode_png(path, bytes);
  throw std::runtime_error(path + ": not a JPEG or PNG file");
}
#else
inline Pixels decode_image(const std::string& path) {
  throw std::runtime_error(path + ": this build has no image decoders (install libjpeg and libpng development "
                           "files and rerun cmake)");
}
#endif

// Pillow's convert(color) from the decoded samples; `color` is "RGB" (3 channels) or "L" (1).
inline Pixels convert(const Pixels& in, const std::string& color) {
  const int out_c = color == "L" ? 1 : 3;
  Pixels out{in.width, in.height, out_c, false, {}};
  const size_t n = static_cast<size_t>(in.width) * in.height;
  out.data.resize(n * out_c);
  for (size_t i = 0; i < n; ++i) {
    const uint8_t* p = &in.data[i * in.channels];
    int r, g, b;
    if (in.cmyk) {
      const int nk = 255 - p[3];
      auto ink = [nk](int c) { const int t = c * nk + 128; return std::clamp(nk - (((t >> 8) + t) >> 8), 0, 255); };
      r = ink(p[0]); g = ink(p[1]); b = ink(p[2]);
    } else if (in.channels <= 2) {  // grey (+ alpha)
      r = g = b = p[0];
    } else {                        // RGB (+ alpha): alpha is dropped
      r = p[0]; g = p[1]; b = p[2];
    }
    if (out_c == 1)
      out.data[i] = (in.channels <= 2 && !in.cmyk) ? p[0]
                                                   : static_cast<uint8_t>((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16);
    else {
      out.data[i * 3] = static_cast<uint8_t>(r);
      out.data[i * 3 + 1] = static_cast<uint8_t>(g);
      out.data[i * 3 + 2] = static_cast<uint8_t>(b);
    }
  }
  return out;
}

// ------------------------------------------------------------------ resampling (Pillow's bilinear)

namespace detail {
constexpr int kPrecisionBits = 32 - 8 - 2;

struct Taps {
  int ksize = 0;
  std::vector<int> first, count;  // per output pixel: first input pixel and number of taps
  std::vector<int32_t> weights;   // ksize per output pixel, fixed point with kPrecisionBits
};

// Triangle filter of support 1, stretched by the reduction factor (antialiasing when shrinking); weights
// normalized to sum 1, then rounded to fixed point.
inline Taps bilinear_taps(int in_size, int out_size) {
  Taps t;
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = 1.0 * filterscale;
  t.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  t.first.resize(out_size);
  t.count.resize(out_size);
  t.weights.assign(static_cast<size_t>(out_size) * t.ksize, 0);
  std::vector<double> w(t.ksize);
  const double ss = 1.0 / filterscale;  // multiplied, not divided: the same rounding as Pillow
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    int xmin = static_cast<int>(center - support + 0.5);  // truncation toward zero, then clamped
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double total = 0.0;
    for (int x = 0; x < xmax; ++x) {
      double d = std::fabs((x + xmin - center + 0.5) * ss);
      w[x] = d < 1.0 ? 1.0 - d : 0.0;
      total += w[x];
    }
    for (int x = 0; x < xmax; ++x) {
      const double v = total != 0.0 ? w[x] / total : w[x];
      t.weights[static_cast<size_t>(xx) * t.ksize + x] =
          static_cast<int32_t>(v < 0 ? -0.5 + v * (1 << kPrecisionBits) : 0.5 + v * (1 << kPrecisionBits));
    }
    t.first[xx] = xmin;
    t.count[xx] = xmax;
  }
  return t;
}

inline uint8_t clip8(int32_t acc) {
  const int32_t v = acc >> kPrecisionBits;
  return static_cast<uint8_t>(v < 0 ? 0 : v > 255 ? 255 : v);
}
}  // namespace detail

// One pass of Pillow's bilinear resampling along x (horizontal) or y, rounding to 8 bits as Pillow does.
inline Pixels resample_axis(const Pixels& in, int out_size, bool horizontal) {
  const int C = in.channels, W = in.width, H = in.height;
  const detail::Taps t = detail::bilinear_taps(horizontal ? W : H, out_size);
  Pixels out{horizontal ? out_size : W, horizontal ? H : out_size, C, false, {}};
  out.data.resize(static_cast<size_t>(out.width) * out.height * C);
  // sample (x, y, c) of `in` is at (y * W + x) * C + c: step between taps is C along x, W * C along y
  const size_t step = horizontal ? C : static_cast<size_t>(W) * C;
  for (int y = 0; y < out.height; ++y)
    for (int x = 0; x < out.width; ++x) {
      const int o = horizontal ? x : y;
      const int32_t* k = &t.weights[static_cast<size_t>(o) * t.ksize];
      const size_t first = horizontal ? (static_cast<size_t>(y) * W + t.first[o]) * C
                                      : (static_cast<size_t>(t.first[o]) * W + x) * C;
      for (int c = 0; c < C; ++c) {
        int32_t acc = 1 << (detail::kPrecisionBits - 1);
        for (int i = 0; i < t.count[o]; ++i) acc += in.data[first + i * step + c] * k[i];
        out.data[(static_cast<size_t>(y) * out.width + x) * C + c] = detail::clip8(acc);
      }
    }
  return out;
}

// Pillow's Image.resize(size, BILINEAR) on 8-bit grey or RGB: two passes, each rounded to 8 bits. Pillow runs
// the horizontal pass first, except (Pillow >= 13) when the height shrinks by more than twice as many pixels
// as the width does: then the vertical pass goes first. A size that does not change skips its pass.
inline Pixels resize_bilinear(const Pixels& in, int out_w, int out_h) {
  const bool vertical_first = out_w != in.width && out_h < in.height && in.height - out_h > 2 * (in.width - out_w);
  if (vertical_first) return resample_axis(resample_axis(in, out_h, false), out_w, true);
  Pixels cur = out_w != in.width ? resample_axis(in, out_w, true) : in;
  return out_h != in.height ? resample_axis(cur, out_h, false) : cur;
}

// ------------------------------------------------------------------ the whole transform

// Steps 2-3: resized and cropped 8-bit pixels of the model's height x width.
inline Pixels resize_and_crop(const Pixels& img, const Preprocess& pre) {
  int w = pre.width, h = pre.height;
  if (pre.resize > 0) {
    const int short_side = std::min(img.width, img.height), long_side = std::max(img.width, img.height);
    // int(resize * long / short) in double, as Python computes it
    const int new_long = static_cast<int>(static_cast<double>(pre.resize) * long_side / short_side);
    w = img.width <= img.height ? pre.resize : new_long;
    h = img.width <= img.height ? new_long : pre.resize;
  }
  Pixels out = resize_bilinear(img, w, h);
  if (pre.crop_h > 0) {
    if (pre.crop_h > out.height || pre.crop_w > out.width)
      throw std::runtime_error("crop " + std::to_string(pre.crop_h) + "x" + std::to_string(pre.crop_w) +
                               " is larger than the resized image");
    const int top = static_cast<int>(std::nearbyint((out.height - pre.crop_h) / 2.0));  // half to even
    const int left = static_cast<int>(std::nearbyint((out.width - pre.crop_w) / 2.0));
    Pixels cropped{pre.crop_w, pre.crop_h, out.channels, false, {}};
    for (int y = 0; y < pre.crop_h; ++y) {
      const uint8_t* row = &out.data[(static_cast<size_t>(top + y) * out.width + left) * out.channels];
      cropped.data.insert(cropped.data.end(), row, row + static_cast<size_t>(pre.crop_w) * out.channels);
    }
    out = std::move(cropped);
  }
  if (out.width != pre.width || out.height != pre.height)
    throw std::runtime_error("preprocessing gives " + std::to_string(out.height) + "x" + std::to_string(out.width) +
                             ", the model takes " + std::to_string(pre.height) + "x" + std::to_string(pre.width));
  return out;
}

// The model input of one image file: float32 CHW appended to `out`.
inline void image_to_input(const std::string& path, const Preprocess& pre, std::vector<float>& out) {
  const Pixels px = resize_and_crop(convert(decode_image(path), pre.color), pre);
  const size_t plane = static_cast<size_t>(px.width) * px.height, base = out.size();
  out.resize(base + plane * px.channels);
  for (int c = 0; c < px.channels; ++c)
    for (size_t i = 0; i < plane; ++i)
      out[base + c * plane + i] = static_cast<float>(
          (static_cast<float>(px.data[i * px.channels + c]) * static_cast<float>(pre.scale) - static_cast<float>(pre.mean[c])) /
          static_cast<float>(pre.std[c]));
}

}  // namespace edgekd
