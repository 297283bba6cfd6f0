"""Host throughput of the Grain image pipeline against today's reader and torchvision.

python benchmarks/image_pipeline.py --torch_python=/work/side/hfvenv/bin/python

Builds two synthetic TFDS array_record datasets with TFDS itself (no
TensorFlow: the builder yields encoded bytes, which TFDS stores as given):
ImageNet-like JPEGs (varied sizes around 400x350, quality 90) and CIFAR-like
32x32 PNGs (TFDS's encoding of cifar100). Then measures images/s of
`jdistill.data.images.ImagePipeline` per worker (``worker_count=1``) and with
one worker per core, against (a) today's reader (one record at a time in this
process, TFDS's own numpy decoding, `TFDSSource`/`TrainBatches` for CIFAR) and
(b) torchvision's transforms under torch's DataLoader, run by
``--torch_python`` on the same bytes. Writes
``benchmarks/results/image_pipeline_<cpu>.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
from PIL import Image

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _natural_like(rng, height, width):
  """Smooth shapes plus fine texture: JPEG sizes near ImageNet's (~110 KB)."""
  coarse = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3),
                        dtype=np.uint8)
  image = np.asarray(Image.fromarray(coarse).resize((width, height),
                                                    Image.BICUBIC), np.int16)
  image = image + rng.normal(0, 12, image.shape).astype(np.int16)
  return np.clip(image, 0, 255).astype(np.uint8)


def _encode(array, fmt, **kw):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt, **kw)
  return buf.getvalue()


def build_datasets(data_dir, n_imagenet, n_cifar):
  """Writes the two datasets as TFDS array_record (if absent) and the JPEG
  bytes as one .npy of objects for the torch side."""
  import tensorflow_datasets as tfds

  class SyntheticImagenet(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, disable_shuffling=True,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(None, None, 3),
                                           encoding_format="jpeg"),
              "label": tfds.features.ClassLabel(num_classes=1000)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      rng = np.random.default_rng(0)
      for i in range(n_imagenet):
        h, w = int(rng.integers(250, 451)), int(rng.integers(300, 501))
        yield i, {"image": _encode(_natural_like(rng, h, w), "JPEG",
                                   quality=90), "label": i % 1000}

  class SyntheticCifar(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, disable_shuffling=True,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(32, 32, 3)),
              "label": tfds.features.ClassLabel(num_classes=100)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      rng = np.random.default_rng(1)
      for i in range(n_cifar):
        yield i, {"image": _encode(_natural_like(rng, 32, 32), "PNG"),
                  "label": i % 100}

  for cls in (SyntheticImagenet, SyntheticCifar):
    builder = cls(data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
      builder.download_and_prepare()
  jpegs = os.path.join(data_dir, "imagenet_jpegs.npy")
  if not os.path.exists(jpegs):
    from jdistill.data.images import open_tfds_images
    source = open_tfds_images("synthetic_imagenet", split="train",
                              data_dir=data_dir)
    raw = source.data_source
    np.save(jpegs, np.array([raw[i]["image"] for i in range(len(raw))],
                            dtype=object), allow_pickle=True)
  return jpegs


def _rate(batches, warmup, count):
  """Images/s over ``count`` batches after ``warmup`` (worker start-up)."""
  it = iter(batches)
  for _ in range(warmup):
    next(it)
  t, cpu = time.perf_counter(), time.process_time()
  n = sum(len(next(it)["y"]) for _ in range(count))
  rate = n / (time.perf_counter() - t)
  cpu = time.process_time() - cpu
  close = getattr(batches, "close", None)
  if close:
    close()
  return round(rate, 1), round(n / cpu, 1)


def _record(rate_and_cpu, in_process):
  """images/s of wall time, and for in-process runs images per CPU-second
  of this process (what one dedicated core would give, on a loaded machine)."""
  rate, per_cpu_s = rate_and_cpu
  out = {"images_per_s": rate, "load": _load()}
  if in_process:
    out["images_per_cpu_s"] = per_cpu_s
  return out


def _load():
  return [float(x) for x in open("/proc/loadavg").read().split()[:3]]


def measure_ours(data_dir, *, workers, batch, count):
  import tensorflow_datasets as tfds
  from jdistill.data import TFDSSource, TrainBatches
  from jdistill.data import images as I

  out = {}
  imagenet = I.open_tfds_images("synthetic_imagenet", split="train",
                                data_dir=data_dir)
  cifar = I.open_tfds_images("synthetic_cifar", split="train",
                             data_dir=data_dir)
  cases = [("imagenet_train", imagenet, 224, I.IMAGENET_MEAN, I.IMAGENET_STD),
           ("imagenet_eval", imagenet, 224, I.IMAGENET_MEAN, I.IMAGENET_STD),
           ("cifar_train", cifar, 32, I.CIFAR100_MEAN, I.CIFAR100_STD)]
  for augment, source, size, mean, std in cases:
    scale = 16 if source is cifar else 1
    for w in sorted({0, 1, workers}):
      pipeline = I.ImagePipeline(
          source, global_batch_size=batch * scale, seed=0, augment=augment,
          image_size=size, mean=mean, std=std, worker_count=w, prefetch=2)
      key = f"grain {augment} worker_count={w}"
      out[key] = _record(_rate(pipeline.batches(), 1 + w,
                               count * max(w, 1)), in_process=w == 0)
      print(key, out[key], flush=True)

  # (a) today's reader: one record at a time, TFDS's numpy decoding (PIL).
  def tfds_decoded(name):
    return tfds.builder(name, data_dir=data_dir).as_data_source(split="train")

  raw = tfds_decoded("synthetic_imagenet")
  mean, std = np.asarray(I.IMAGENET_MEAN), np.asarray(I.IMAGENET_STD)

  def one_at_a_time():
    order = np.random.default_rng(0).permutation(len(raw))
    for start in range(0, len(order), batch):
      images = [I.augment_image(raw[int(i)]["image"],
                                np.random.default_rng([0, 0, int(i)]),
                                augment="imagenet_train", image_size=224)
                for i in order[start:start + batch]]
      x = ((np.stack(images) / 255.0 - mean) / std).astype(np.float32)
      yield {"x": x, "y": np.zeros(len(images))}

  key = "today one-record reader (tfds numpy decode) imagenet_train"
  out[key] = _record(_rate(one_at_a_time(), 1, count), in_process=True)
  print(key, out[key], flush=True)
  batches = TrainBatches(TFDSSource(tfds_decoded("synthetic_cifar"), "image",
                                    "label"), batch * 16, 0)
  key = "today TFDSSource+TrainBatches cifar (no augmentation)"
  out[key] = _record(_rate(batches.iterate(), 1, count), in_process=True)
  print(key, out[key], flush=True)
  return out


def measure_embedded(*, batch, count):
  """Embedded in-memory data: ArraySource batching vs the Grain pipeline."""
  from jdistill.data import TrainBatches, load_dataset
  from jdistill.data import images as I

  train = load_dataset("digits32").train
  out = {}
  key = "digits32 ArraySource+TrainBatches"
  out[key] = _record(_rate(TrainBatches(train, batch, 0).iterate(), 1,
                           count * 4), in_process=True)
  print(key, out[key], flush=True)
  uint8 = I.ArrayImages(np.round(train.x * 255).astype(np.uint8), train.y)
  pipeline = I.ImagePipeline(uint8, global_batch_size=batch, seed=0,
                             augment="none", image_size=32,
                             mean=(0.0,) * 3, std=(1.0,) * 3)
  key = "digits32 grain augment=none worker_count=0"
  out[key] = _record(_rate(pipeline.batches(), 1, count * 4),
                     in_process=True)
  print(key, out[key], flush=True)
  return out


def measure_decoders(jpegs, extra_path, n=200):
  """Decode-only images per CPU-second of the JPEG decoders that are
  importable (run last:
  importing OpenCV would change TFDS's own decoder)."""
  if extra_path:
    sys.path.append(extra_path)
  data = list(np.load(jpegs, allow_pickle=True)[:n])
  out = {}
  decoders = {"pillow": lambda b: np.asarray(Image.open(io.BytesIO(b)))}
  try:
    import simplejpeg
    decoders["simplejpeg"] = lambda b: simplejpeg.decode_jpeg(b)
  except ImportError:
    pass
  try:
    import cv2
    cv2.setNumThreads(1)
    decoders["opencv"] = lambda b: cv2.imdecode(np.frombuffer(b, np.uint8),
                                                cv2.IMREAD_COLOR)
  except ImportError:
    pass
  for _ in range(2):  # interleaved twice: the machine is shared
    for name, decode in decoders.items():
      t = time.process_time()
      for b in data:
        decode(b)
      rate = len(data) / (time.process_time() - t)
      out[name] = max(out.get(name, 0.0), round(rate, 1))
  print("decode only", out, flush=True)
  return out


TORCH_SIDE = r'''
import io, json, sys, time
import numpy as np, torch
# The PyPI torchvision wheel is built against CUDA torch; with torch+cpu its
# C ops do not load and its import fails registering fake kernels for them.
# Define the two ops it needs so that the pure-Python transforms import.
_lib = torch.library.Library("torchvision", "DEF")
for _op in ("nms", "qnms"):
  _lib.define(_op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
import torchvision
from torchvision import transforms as T
from PIL import Image

jpegs, cifar_npz, workers, batch, count = sys.argv[1:6]
workers, batch, count = int(workers), int(batch), int(count)
torch.set_num_threads(1)
IM = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CI = T.Normalize((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
TRANSFORMS = {
  "imagenet_train": T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), IM]),
  "imagenet_eval": T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), IM]),
  "cifar_train": T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), CI]),
}

class Bytes(torch.utils.data.Dataset):
  def __init__(self, data, labels, transform):
    self.data, self.labels, self.transform = data, labels, transform
  def __len__(self):
    return len(self.data)
  def __getitem__(self, i):
    return self.transform(Image.open(io.BytesIO(self.data[i])).convert("RGB")), int(self.labels[i])

def init(_):
  torch.set_num_threads(1)

def rate(loader, warmup, n):
  it = iter(loader)
  for _ in range(warmup):
    next(it)
  t, cpu = time.perf_counter(), time.process_time()
  k = sum(len(next(it)[1]) for _ in range(n))
  return round(k / (time.perf_counter() - t), 1), round(k / (time.process_time() - cpu), 1)

if __name__ == "__main__":
  data = list(np.load(jpegs, allow_pickle=True))
  cifar = np.load(cifar_npz)
  out = {"versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                      "pillow": Image.__version__}}
  for name in TRANSFORMS:
    if name == "cifar_train":
      ds = [(Image.fromarray(a), int(l)) for a, l in zip(cifar["x"], cifar["y"])]
      class Arr(torch.utils.data.Dataset):
        def __len__(self): return len(ds)
        def __getitem__(self, i): return TRANSFORMS[name](ds[i][0]), ds[i][1]
      dataset, b = Arr(), batch * 16
    else:
      dataset, b = Bytes(data, np.arange(len(data)) % 1000, TRANSFORMS[name]), batch
    for w in sorted({0, 1, workers}):
      loader = torch.utils.data.DataLoader(dataset, batch_size=b, shuffle=True, num_workers=w,
                                           worker_init_fn=init, prefetch_factor=2 if w else None,
                                           persistent_workers=False, drop_last=True)
      key = f"torchvision {name} num_workers={w}"
      wall, per_cpu = rate(loader, 1 + w, count * max(w, 1))
      out[key] = {"images_per_s": wall,
                  "load": [float(x) for x in open("/proc/loadavg").read().split()[:3]]}
      if w == 0:
        out[key]["images_per_cpu_s"] = per_cpu
      print(key, out[key], flush=True)
  print("JSON" + json.dumps(out))
'''


def measure_torch(python, jpegs, data_dir, *, workers, batch, count):
  from jdistill.data import images as I
  cifar = I.open_tfds_images("synthetic_cifar", split="train",
                             data_dir=data_dir)
  npz = os.path.join(data_dir, "cifar_uint8.npz")
  if not os.path.exists(npz):
    pairs = [cifar[i] for i in range(len(cifar))]
    np.savez(npz, x=np.stack([p[0] for p in pairs]),
             y=np.array([p[1] for p in pairs]))
  script = os.path.join(data_dir, "torch_side.py")
  with open(script, "w") as f:
    f.write(TORCH_SIDE)
  proc = subprocess.run([python, script, jpegs, npz, str(workers), str(batch),
                         str(count)], capture_output=True, text=True,
                        check=False)
  sys.stdout.write(proc.stdout.split("JSON")[0])
  if proc.returncode:
    raise RuntimeError(f"{python} {script} failed: "
                       f"{proc.stderr.strip().splitlines()[-1]}")
  return json.loads(proc.stdout.split("JSON")[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default="/tmp/jdistill_image_bench")
  parser.add_argument("--n_imagenet", type=int, default=2000)
  parser.add_argument("--n_cifar", type=int, default=10000)
  parser.add_argument("--workers", type=int, default=None,
                      help="worker_count of the all-cores run (default: cores)")
  parser.add_argument("--batch", type=int, default=32,
                      help="ImageNet batch; CIFAR uses 16x")
  parser.add_argument("--count", type=int, default=6,
                      help="batches timed per worker")
  parser.add_argument("--torch_python", default=None,
                      help="python with torch+torchvision for baseline (b)")
  parser.add_argument("--decoders_path", default=None,
                      help="a --target directory holding simplejpeg and "
                      "opencv-python-headless, for the decode-only comparison")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  from jdistill.data import images as I

  workers = args.workers or I.default_worker_count()
  os.makedirs(args.data_dir, exist_ok=True)
  jpegs = build_datasets(args.data_dir, args.n_imagenet, args.n_cifar)
  sizes = [len(b) for b in np.load(jpegs, allow_pickle=True)]
  import grain
  import PIL
  cpu = next((line.split(":", 1)[1].strip()
              for line in open("/proc/cpuinfo") if "model name" in line),
             platform.processor())
  result = {
      "command": " ".join(["python"] + sys.argv),
      "machine": {"cpu": cpu, "cores": os.cpu_count(),
                  "usable_cores": I.default_worker_count(),
                  "load_at_start": _load()},
      "versions": {"python": platform.python_version(),
                   "grain": grain.__version__, "pillow": PIL.__version__,
                   "numpy": np.__version__},
      "data": {"imagenet_like": {"n": len(sizes),
                                 "mean_jpeg_bytes": round(float(np.mean(sizes))),
                                 "sizes": "h in [250,450], w in [300,500]",
                                 "quality": 90},
               "cifar_like": {"n": args.n_cifar, "format": "PNG 32x32"}},
      "batch": args.batch, "workers": workers,
  }
  result["ours"] = measure_ours(args.data_dir, workers=workers,
                                batch=args.batch, count=args.count)
  result["embedded"] = measure_embedded(batch=args.batch * 16,
                                        count=args.count)
  if args.torch_python:
    result["torchvision"] = measure_torch(
        args.torch_python, jpegs, args.data_dir, workers=workers,
        batch=args.batch, count=args.count)
  result["decode_only_images_per_s"] = measure_decoders(jpegs,
                                                       args.decoders_path)
  result["load_at_end"] = _load()
  tag = cpu.split()[0] + ("_" + cpu.split()[1] if len(cpu.split()) > 1 else "")
  out = args.out or os.path.join(RESULTS, f"image_pipeline_{tag}.json")
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print("wrote", out)


if __name__ == "__main__":
  main()
