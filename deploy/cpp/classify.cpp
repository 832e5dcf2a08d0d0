// Classify images or samples with an edgekd deploy bundle through the ONNX Runtime C++ API.
//
//   edgekd_classify BUNDLE_DIR --images A.jpg B.png ... [--logits] [--dump-input FILE] [--model model.ort]
//                   [--top K] [--threads N]
//   edgekd_classify BUNDLE_DIR INPUT_FILE [--pixels] [--model model.ort] [--top K] [--threads N]
//
// --images: JPEG (libjpeg) or PNG (libpng) files, preprocessed as preprocess.json says (see preprocess.h: EXIF
//           orientation, colour conversion, shorter-side bilinear antialiased resize, center crop, normalize);
//           --logits also prints every logit, --dump-input writes the float32 NCHW model inputs to FILE.
// INPUT_FILE is a raw tensor file:
//   default   float32 NCHW, already normalized (what eval.npz["inputs"].tofile() writes); N = size / (C*H*W*4)
//   --pixels  uint8 HWC at the model's H x W (a decoded camera frame / image); N = size / (H*W*C),
//             normalized here as preprocess.json says: x = (pixel * scale - mean[c]) / std[c]
// Prints the top-K classes per sample with labels from labels.json.
#include <onnxruntime_cxx_api.h>

#include "preprocess.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <numeric>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Just enough JSON for preprocess.json and labels.json (flat objects, arrays of numbers or strings), so the
// example has no dependency besides ONNX Runtime. A real app would use its JSON library.
size_t value_pos(const std::string& json, const std::string& key) {
  size_t p = json.find("\"" + key + "\"");
  if (p == std::string::npos) return p;
  p = json.find(':', p);
  return p == std::string::npos ? p : json.find_first_not_of(" \t\r\n", p + 1);
}

std::vector<double> json_numbers(const std::string& json, const std::string& key) {
  size_t p = value_pos(json, key);
  if (p == std::string::npos) throw std::runtime_error("preprocess.json has no \"" + key + "\"");
  std::vector<double> out;
  const bool array = json[p] == '[';
  size_t end = array ? json.find(']', p) : json.find_first_of(",}", p);
  std::string body = json.substr(p + (array ? 1 : 0), end - p - (array ? 1 : 0));
  std::replace(body.begin(), body.end(), ',', ' ');
  std::istringstream ss(body);
  for (double v; ss >> v;) out.push_back(v);
  return out;
}

std::string json_string(const std::string& json, const std::string& key, const std::string& fallback) {
  size_t p = value_pos(json, key);
  if (p == std::string::npos || json[p] != '"') return fallback;
  return json.substr(p + 1, json.find('"', p + 1) - p - 1);
}

std::vector<std::string> json_string_list(const std::string& json) {
  std::vector<std::string> out;
  for (size_t p = json.find('"'); p != std::string::npos; p = json.find('"', p + 1)) {
    std::string s;
    for (++p; p < json.size() && json[p] != '"'; ++p) {
      if (json[p] == '\\' && p + 1 < json.size()) {
        ++p;
        s += json[p] == 'n' ? '\n' : json[p] == 't' ? '\t' : json[p];  // \uXXXX kept as-is: rare in labels
      } else {
        s += json[p];
      }
    }
    out.push_back(s);
  }
  return out;
}

bool json_is_null(const std::string& json, const std::string& key) {
  const size_t p = value_pos(json, key);
  return p == std::string::npos || json.compare(p, 4, "null") == 0;
}

// preprocess.json -> the contract's fields; the earlier format (no "format" key) has no resize or crop.
edgekd::Preprocess parse_preprocess(const std::string& pre) {
  edgekd::Preprocess p;
  const std::string format = json_string(pre, "format", "");
  if (!format.empty() && format != "edgekd-preprocess/2")
    throw std::runtime_error("preprocess.json format " + format + " is not supported (edgekd-preprocess/2)");
  p.height = static_cast<int>(json_numbers(pre, "height").at(0));
  p.width = static_cast<int>(json_numbers(pre, "width").at(0));
  const int channels = static_cast<int>(json_numbers(pre, "channels").at(0));
  p.color = json_string(pre, "color", channels == 1 ? "L" : "RGB");
  if (!((p.color == "L" && channels == 1) || (p.color == "RGB" && channels == 3)))
    throw std::runtime_error("preprocess.json: color " + p.color + " with " + std::to_string(channels) +
                             " channels is not supported (RGB/3 or L/1)");
  if (!json_is_null(pre, "resize")) p.resize = static_cast<int>(json_numbers(pre, "resize").at(0));
  if (!json_is_null(pre, "crop")) {
    const std::vector<double> crop = json_numbers(pre, "crop");
    p.crop_h = static_cast<int>(crop.at(0));
    p.crop_w = static_cast<int>(crop.at(crop.size() > 1 ? 1 : 0));
  }
  const std::vector<double> scale = json_numbers(pre, "scale");
  p.scale = scale.empty() ? 1.0 / 255 : scale[0];
  p.mean = json_numbers(pre, "mean");
  p.std = json_numbers(pre, "std");
  if (p.mean.size() != static_cast<size_t>(channels) || p.std.size() != static_cast<size_t>(channels))
    throw std::runtime_error("preprocess.json: mean and std need one value per channel");
  return p;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> pos;
  std::string model_file = "model.onnx";
  std::vector<std::string> images;
  std::string dump_input;
  bool pixels = false, print_logits = false;
  int top = 5, threads = 1;  // one thread: predictable latency on small devices, as edgekd benchmarks it
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--pixels") pixels = true;
    else if (a == "--images")
      while (i + 1 < argc && std::string(argv[i + 1]).rfind("--", 0) != 0) images.push_back(argv[++i]);
    else if (a == "--logits") print_logits = true;
    else if (a == "--dump-input" && i + 1 < argc) dump_input = argv[++i];
    else if (a == "--model" && i + 1 < argc) model_file = argv[++i];
    else if (a == "--top" && i + 1 < argc) top = std::stoi(argv[++i]);
    else if (a == "--threads" && i + 1 < argc) threads = std::stoi(argv[++i]);
    else pos.push_back(a);
  }
  if (pos.size() != (images.empty() ? 2u : 1u)) {
    std::cerr << "usage: edgekd_classify BUNDLE_DIR (--images IMAGE... [--logits] [--dump-input FILE] | "
                 "INPUT_FILE [--pixels]) [--model model.ort] [--top K] [--threads N]\n";
    return 2;
  }
  try {
    const std::string dir = pos[0] + "/";
    const std::string pre = read_file(dir + "preprocess.json");
    const std::vector<std::string> labels = json_string_list(read_file(dir + "labels.json"));
    const int64_t C = static_cast<int64_t>(json_numbers(pre, "channels").at(0));
    const int64_t H = static_cast<int64_t>(json_numbers(pre, "height").at(0));
    const int64_t W = static_cast<int64_t>(json_numbers(pre, "width").at(0));
    const std::string in_name = json_string(pre, "input_name", "input");
    const std::string out_name = json_string(pre, "output_name", "logits");
    const int64_t per = C * H * W;

    std::vector<float> input;
    if (!images.empty()) {  // image files -> the contract's transform
      const edgekd::Preprocess spec = parse_preprocess(pre);
      for (const std::string& image : images) edgekd::image_to_input(image, spec, input);
      if (!dump_input.empty()) {
        std::ofstream dump(dump_input, std::ios::binary);
        dump.write(reinterpret_cast<const char*>(input.data()), static_cast<std::streamsize>(input.size() * sizeof(float)));
        if (!dump) throw std::runtime_error("cannot write " + dump_input);
      }
    } else if (pixels) {
      const std::string raw = read_file(pos[1]);  // HWC uint8 -> NCHW float32
      const std::vector<double> mean = json_numbers(pre, "mean"), stdv = json_numbers(pre, "std");
      const std::vector<double> scale_v = json_numbers(pre, "scale");
      const double scale = scale_v.empty() ? 1.0 / 255 : scale_v[0];
      if (raw.size() % per) throw std::runtime_error("pixel file size is not a multiple of H*W*C");
      const int64_t n = static_cast<int64_t>(raw.size()) / per;
      input.resize(raw.size());
      for (int64_t s = 0; s < n; ++s)
        for (int64_t y = 0; y < H; ++y)
          for (int64_t x = 0; x < W; ++x)
            for (int64_t c = 0; c < C; ++c) {
              const auto v = static_cast<uint8_t>(raw[((s * H + y) * W + x) * C + c]);
              input[((s * C + c) * H + y) * W + x] = static_cast<float>((v * scale - mean[c]) / stdv[c]);
            }
    } else {
      const std::string raw = read_file(pos[1]);
      if (raw.size() % (per * sizeof(float))) throw std::runtime_error("tensor file size is not N*C*H*W*4");
      input.resize(raw.size() / sizeof(float));
      std::copy(raw.begin(), raw.end(), reinterpret_cast<char*>(input.data()));  // little-endian float32
    }
    const int64_t n = static_cast<int64_t>(input.size()) / per;

    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "edgekd");
    Ort::SessionOptions options;
    options.SetIntraOpNumThreads(threads);
    options.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    Ort::Session session(env, (dir + model_file).c_str(), options);  // .onnx or .ort (ORT format)
    Ort::MemoryInfo memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    const char* in_names[] = {in_name.c_str()};
    const char* out_names[] = {out_name.c_str()};

    for (int64_t start = 0; start < n; start += 64) {  // the batch axis is dynamic: up to 64 per run
      const int64_t b = std::min<int64_t>(64, n - start);
      const std::vector<int64_t> shape{b, C, H, W};
      Ort::Value tensor = Ort::Value::CreateTensor<float>(memory, input.data() + start * per,
                                                          static_cast<size_t>(b * per), shape.data(), shape.size());
      auto outputs = session.Run(Ort::RunOptions{nullptr}, in_names, &tensor, 1, out_names, 1);
      const float* logits = outputs[0].GetTensorData<float>();
      const int64_t classes = outputs[0].GetTensorTypeAndShapeInfo().GetShape().at(1);
      for (int64_t s = 0; s < b; ++s) {
        const float* row = logits + s * classes;
        const float peak = *std::max_element(row, row + classes);
        double sum = 0;
        for (int64_t k = 0; k < classes; ++k) sum += std::exp(row[k] - peak);
        std::vector<int64_t> order(static_cast<size_t>(classes));
        std::iota(order.begin(), order.end(), 0);
        const auto k = std::min<int64_t>(top, classes);
        std::partial_sort(order.begin(), order.begin() + k, order.end(),
                          [row](int64_t a, int64_t c) { return row[a] > row[c]; });
        std::cout << "sample " << start + s << ":" << std::fixed << std::setprecision(2);
        for (int64_t j = 0; j < k; ++j) {
          const int64_t cls = order[j];
          const std::string label = cls < static_cast<int64_t>(labels.size()) ? labels[cls] : std::to_string(cls);
          std::cout << (j ? " |" : "") << " " << cls << " \"" << label << "\" "
                    << 100.0 * std::exp(row[cls] - peak) / sum << "%";
        }
        std::cout << "\n";
        if (print_logits) {
          std::cout << "logits " << start + s << ":" << std::setprecision(9) << std::scientific;
          for (int64_t k2 = 0; k2 < classes; ++k2) std::cout << " " << row[k2];
          std::cout << std::fixed << "\n";
        }
      }
    }
  } catch (const std::exception& e) {  // Ort::Exception derives from std::exception
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
