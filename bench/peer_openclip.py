"""Benchmark: this harness against open_clip 3.3.0's own trainer on the same work, side by side.

    python -m bench.peer_openclip [--repeat 3] [--quick] [--procs 1 2] [--out FILE]     (make bench-peer)

Measured for each row — this harness at 1 and 2 processes under ZeRO-0 and ZeRO-2, open_clip's plain
DDP at 1 and 2 processes (the same open_clip runs stand beside both ZeRO rows of a process count):
- steady samples/s: global batch × the optimizer steps from the 5th to the last / the seconds between
  their TensorBoard events (both log every step; the start-up and the first steps are left out);
- wall time of the whole run (launch to exit of `torch.distributed.run`), and of it launch → step 5
  and last step → exit;
- peak RSS of each trainer process, and its anonymous part (RssAnon: file-backed pages of the same
  libraries map differently from one install to another, so the table also shows `import torch`
  alone in both environments); every process under the torchrun agent is read every 0.2 s, loader
  workers reported apart.
Runs alternate strictly (this harness, open_clip, this harness, open_clip, …), `--repeat` rounds;
medians, and the median of paired ratios (each harness run over the open_clip run right after it).

Held constant: the model (a 3.39M-parameter tiny CLIP — vision 64 px, patch 8, width 64, 2 layers,
2 heads; text width 64, 2 layers, context 77, open_clip's own 49,408-token BPE; GELU; embeddings 64),
the shards (`python -m data_prep`, read unchanged by both), batch 32 per process, fp32, one loader
worker, OMP_NUM_THREADS=1, no GPU, each image's first caption (open_clip's `txt`; this harness's
data.captions=first), AdamW lr 1e-3 (betas 0.9/0.98, eps 1e-6, weight decay 0.1 off
biases, norms and the temperature), warm-up 5 steps then cosine, gradient clipping 1.0, the loss
over the global batch with gathered gradients, a 0.9–1 random resized crop, one epoch, no evaluation,
one checkpoint at the end. What is not held constant is printed with the table.

From nothing: open-clip-torch 3.3.0 goes into its own virtual environment (`--venv`, default
.venv-peer/, with the project's torch, torchvision and tensorboard pins; once, a stamp
file says what is there), the shards are written by `python -m data_prep`, the model is written once
for each side (a Hugging Face CLIP folder; an open_clip `local-dir:` folder). Everything a run makes
goes under runs/peer_openclip[-quick]/, the shards under data/peer_openclip[-quick]/.
Writes bench/results/peer_openclip-<cpu>.json (`--quick`: runs/peer_openclip-quick/, not a result).

This file is also the open_clip launcher (`openclip-worker`, run by .venv-peer's Python): it may
import only the standard library at the top.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.common import Target

ROOT = Path(__file__).resolve().parents[1]
WORKER = "openclip-worker"
BATCH = 32
STEADY_FROM = 5  # steps before this are start-up (warm-up, first batches, allocator growth)
LOSS_END = 8  # the end of a run's loss curve: the mean over its last 8 steps
RSS_EVERY_S = 0.2
RUN_TIMEOUT_S = 1800
LOCKED = ("torch", "torchvision", "tensorboard")  # the project's versions (requirements.lock)
# open_clip's training extra: webdataset<=0.2.86 (its tar reader expects 0.2's samples), pandas, fsspec
PEER_PACKAGES = ("open-clip-torch[training]==3.3.0",)
TOKEN_CHECK = [
    "A red circle on the left on a black background .",
    "Two dogs, running: HELLO world's café 123!",
]
OPTIM = {"lr": 1e-3, "warmup": 5, "wd": 0.1, "beta1": 0.9, "beta2": 0.98, "eps": 1e-6, "clip": 1.0}
NOT_HELD = (
    "initial weights: each side's own random init (the same shapes; not the same numbers)",
    "this harness adds its projection heads (linear, identity at start): +8,320 parameters",
    "text padding: this harness pads to the batch's longest caption, open_clip to 77 tokens",
    "the layers: HF CLIPModel's against open_clip's own transformer (nn.MultiheadAttention)",
    "optimizer step: DeepSpeed's engine (ZeRO-0/2) with torch's fused AdamW, against open_clip's torch "
    "AdamW under DDP (built with torch's defaults: on the CPU, the per-tensor loop)",
    "shard checks: this harness checks sizes up front and hashes each shard as it streams it (data.verify, "
    "its default: sha256); open_clip checks none",
    "end: this harness writes a DeepSpeed checkpoint and an HF export (run.verify_export=false); "
    "open_clip writes epoch_1.pt",
    "shuffling: this harness's buffer holds 1,000 samples; open_clip's 5,000 (it starts at 1,000)",
    "open_clip clamps the temperature at ln 100 after every step",
)


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Shape:
    """The tiny CLIP both sides train (the issue's 3.39M parameters, most of them the token embedding)."""

    image: int = 64
    patch: int = 8
    width: int = 64
    layers: int = 2
    heads: int = 2
    text_width: int = 64
    context: int = 77
    vocab: int = 49408
    embed: int = 64

    def openclip(self) -> dict[str, Any]:
        """open_clip_config.json for `--model local-dir:FOLDER` (open_clip factory.py: model_cfg +
        preprocess_cfg); vision heads are width / head_width, activations nn.GELU unless quick_gelu."""
        return {
            "model_cfg": {
                "embed_dim": self.embed,
                "vision_cfg": {
                    "image_size": self.image,
                    "patch_size": self.patch,
                    "width": self.width,
                    "layers": self.layers,
                    "head_width": self.width // self.heads,
                    "mlp_ratio": 4.0,
                },
                "text_cfg": {
                    "context_length": self.context,
                    "vocab_size": self.vocab,
                    "width": self.text_width,
                    "heads": self.heads,
                    "layers": self.layers,
                    "mlp_ratio": 4.0,
                },
            },
            "preprocess_cfg": {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic"},
        }

    def hf(self, tokenizer: Any) -> Any:
        """The same shapes as a transformers CLIPConfig (exact GELU, like open_clip's default)."""
        from transformers import CLIPConfig

        tower = dict(num_hidden_layers=self.layers, num_attention_heads=self.heads, hidden_act="gelu")
        return CLIPConfig(
            text_config=dict(
                tower,
                hidden_size=self.text_width,
                intermediate_size=4 * self.text_width,
                max_position_embeddings=self.context,
                vocab_size=self.vocab,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            ),
            vision_config=dict(
                tower,
                hidden_size=self.width,
                intermediate_size=4 * self.width,
                image_size=self.image,
                patch_size=self.patch,
            ),
            projection_dim=self.embed,
        )


# OpenAI CLIP's normalisation: open_clip's OPENAI_DATASET_MEAN/STD and CLIPImageProcessor's defaults.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE, in open_clip's order (tokenizer.py bytes_to_unicode)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def write_bpe(bpe_gz: Path, folder: Path) -> None:
    """open_clip's bundled BPE as the vocab.json and merges.txt HF's CLIP tokenizer reads. Both cut the
    merges at line 49152-256-2 of the file (its first line is a header); the ids are the bytes, the
    bytes at a word's end, one token per merge, then start and end of text: 49,408 in open_clip's order."""
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = _byte_symbols()
    vocab = [
        *symbols,
        *(s + "</w>" for s in symbols),
        *("".join(line.split()) for line in lines),
        "<|startoftext|>",
        "<|endoftext|>",
    ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")


def write_hf_clip(shape: Shape, bpe_gz: Path, folder: Path) -> int:
    """A random-init CLIPModel, its tokenizer (open_clip's BPE) and a 64 px CLIPImageProcessor, saved
    with save_pretrained into `folder`; returns the model's parameter count. The tokenizer is loaded
    with from_pretrained: CLIPTokenizer(vocab_file=…, merges_file=…) ignores both files in
    transformers 5.24 (shared/notes/stack-on-cpu.md)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    write_bpe(bpe_gz, folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=shape.context)
    if len(tokenizer) != shape.vocab:
        raise SystemExit(f"{folder}: the converted BPE has {len(tokenizer)} tokens, not {shape.vocab}")
    torch.manual_seed(0)
    model = CLIPModel(shape.hf(tokenizer))
    processor = CLIPImageProcessor(
        size={"shortest_edge": shape.image},
        crop_size={"height": shape.image, "width": shape.image},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    for part in (model, tokenizer, processor):
        part.save_pretrained(str(folder))
    return sum(p.numel() for p in model.parameters())


def _peer_json(python: Path, model: str) -> dict[str, Any]:
    """From open_clip's environment: where its bundled BPE lies, its token ids for TOKEN_CHECK, and
    the parameter count of the model it builds from `model`."""
    code = (
        "import json, logging, sys, open_clip\n"
        "from open_clip.tokenizer import default_bpe\n"
        "logging.disable(logging.WARNING)\n"
        "ids = [[int(x) for x in row if x] for row in open_clip.get_tokenizer('ViT-B-32')(json.loads(sys.argv[1]))]\n"
        "m = open_clip.create_model(sys.argv[2], device='cpu') if sys.argv[2] else None\n"
        "n = sum(p.numel() for p in m.parameters()) if m else 0\n"
        "print(json.dumps({'bpe': default_bpe(), 'ids': ids, 'params': n}))\n"
    )
    out = subprocess.run(
        [str(python), "-c", code, json.dumps(TOKEN_CHECK), model],
        capture_output=True,
        text=True,
        env=run_env(),
        cwd=python.parents[1],
    )
    if out.returncode != 0:
        raise SystemExit(f"open_clip in {python.parents[1]} does not load:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class Models:
    """The two folders of the same model, and what each side counts in it."""

    hf: Path
    openclip: Path
    hf_params: int
    openclip_params: int


def build_models(shape: Shape, python: Path, out: Path) -> Models:
    """Both sides' model folders, once per shape (a rerun with the same shape keeps them), and a check
    that both tokenizers give the same ids."""
    record = out / "shape.json"
    hf, oc = out / "hf-clip", out / "open_clip"
    if record.is_file() and json.loads(record.read_text()).get("shape") == asdict(shape):
        r = json.loads(record.read_text())
        return Models(hf, oc, r["hf_params"], r["openclip_params"])
    shutil.rmtree(out, ignore_errors=True)
    oc.mkdir(parents=True)
    (oc / "open_clip_config.json").write_text(json.dumps(shape.openclip(), indent=2) + "\n")
    peer = _peer_json(python, f"local-dir:{oc}")
    hf_params = write_hf_clip(shape, Path(peer["bpe"]), hf)
    from transformers import CLIPTokenizer

    ours = CLIPTokenizer.from_pretrained(str(hf))(TOKEN_CHECK)["input_ids"]
    if ours != peer["ids"]:
        raise SystemExit(
            f"{hf}: the converted tokenizer disagrees with open_clip's:\n  {ours}\n  {peer['ids']}"
        )
    models = Models(hf, oc, hf_params, peer["params"])
    record.write_text(
        json.dumps({"shape": asdict(shape), "hf_params": hf_params, "openclip_params": peer["params"]})
    )
    return models


# --------------------------------------------------------------------------- set-up


def lock_pins(names: tuple[str, ...]) -> list[str]:
    """`name==version` of `names` as requirements.lock pins them (the project's own versions)."""
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep and name.lower() in names:
            pins[name.lower()] = f"{name}=={version.strip()}"
    missing = [n for n in names if n not in pins]
    if missing:
        raise SystemExit(f"{ROOT / 'requirements.lock'}: no pin for {', '.join(missing)}")
    return [pins[n] for n in names]


def peer_python(venv: Path) -> Path:
    """open_clip in its own virtual environment (never the project's .venv): created with the Python
    the project's venv is built on, filled once; the stamp holds what was installed."""
    python, stamp = venv / "bin" / "python", venv / ".installed-peer"
    wanted = [*lock_pins(LOCKED), *PEER_PACKAGES]
    if stamp.is_file() and stamp.read_text().split() == wanted and python.exists():
        return python
    print(f"installing {' '.join(wanted)} into {venv} (once; a few minutes)", flush=True)
    venv.mkdir(parents=True, exist_ok=True)
    log = venv / "install.log"
    with open(log, "w") as out:
        steps = [
            [str(Path(sys.base_prefix) / "bin" / "python3"), "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "-q", *wanted],
        ]
        for step in steps[0 if not python.exists() else 1 :]:
            # cwd: from the repository, pip would see clip_harness.egg-info and judge its requirements
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, cwd=venv).returncode != 0:
                raise SystemExit(f"installing open_clip failed: {' '.join(step)}\n  see {log}")
    stamp.write_text("\n".join(wanted) + "\n")
    return python


def prepare_shards(out: Path, samples: int) -> Path:
    """The synthetic Flickr8k-format set through the project's own `python -m data_prep` (a rerun keeps
    what matches): `samples` training images in four equal shards, so every rank gets equal shares."""
    raw, shards = out / "raw", out / "flickr8k"
    sizes = {
        "cifar_per_batch": 10,
        "cifar_test": 10,
        "flickr_train": samples,
        "flickr_dev": 32,
        "flickr_test": 32,
    }
    for argv in (
        ["synthetic", "--out", str(raw), "--quiet", *(f"synthetic.{k}={v}" for k, v in sizes.items())],
        [
            "flickr8k",
            "--images",
            str(raw / "Flickr8k_Dataset.zip"),
            "--captions",
            str(raw / "Flickr8k_text.zip"),
            "--out",
            str(shards),
            "--shard-size",
            str(samples // 4),
            "--quiet",
        ],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "data_prep", *argv], cwd=ROOT, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise SystemExit(f"python -m data_prep {argv[0]} failed:\n{done.stderr[-2000:]}")
    return shards / "manifest.json"


def shard_pattern(manifest: Path) -> tuple[str, int]:
    """open_clip's `--train-data` brace pattern for the train split, and its sample count."""
    split = json.loads(manifest.read_text())["splits"]["train"]
    names = [s["name"] for s in split["shards"]]
    expected = [f"flickr8k-train-{i:06d}.tar" for i in range(len(names))]
    if names != expected:
        raise SystemExit(f"{manifest}: train shards {names[:3]}… are not flickr8k-train-000000.tar onwards")
    folder = manifest.parent / "train"
    return f"{folder}/flickr8k-train-{{000000..{len(names) - 1:06d}}}.tar", int(split["num_samples"])


# --------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class Spec:
    """One run: which trainer, how many processes, which ZeRO stage (this harness only), which round."""

    side: str  # "harness" or "open_clip"
    procs: int
    zero: int  # -1 for open_clip
    round: int

    @property
    def name(self) -> str:
        return f"r{self.round}-{self.side}-{self.procs}p" + (f"-z{self.zero}" if self.zero >= 0 else "")


@dataclass
class Measured:
    """What one run gave."""

    spec: Spec
    samples_per_s: float
    wall_s: float
    to_step5_s: float
    tail_s: float
    steps: int
    rss_mb: list[float] = field(default_factory=list)  # peak of each trainer process
    anon_mb: list[float] = field(default_factory=list)
    loader_rss_mb: list[float] = field(default_factory=list)
    loss_first: float = 0.0
    loss_end: float = 0.0  # the mean over the last LOSS_END steps (one batch's loss is noisy)
    attempts: int = 1


def run_env() -> dict[str, str]:
    """The environment of every run: one thread, no GPU, offline."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "PYTHONWARNINGS": "ignore",
    }


def torchrun(python: Path | str, procs: int) -> list[str]:
    """Both sides start the same way, one process per rank, even for one process."""
    return [str(python), "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]


def harness_command(spec: Spec, models: Models, manifest: Path, run_dir: Path) -> list[str]:
    """`python -m trainer` on the demo's Flickr8k config, every setting that matters spelled out:
    the HF folder instead of the tiny preset, no evaluation, the epoch-end checkpoint kept (open_clip
    writes one too), the export's read-back check off (open_clip has none)."""
    o = OPTIM
    return [
        *torchrun(sys.executable, spec.procs),
        "-m",
        "trainer",
        "--config",
        str(ROOT / "configs/demo-flickr8k.yaml"),
        f"run.dir={run_dir}",
        "resume=none",
        f"model.name={models.hf}",
        "model.preset=''",
        "model.head=linear",
        "model.head_dim=0",
        f"data.manifest={manifest}",
        "data.workers=1",
        "data.shuffle_buffer=1000",
        "data.random_crop=true",
        "data.crop_scale_min=0.9",
        "data.hflip=false",
        "data.captions=first",
        "train.objective=contrastive",
        f"train.batch_size={BATCH}",
        "train.grad_accum=1",
        "train.epochs=1",
        "train.max_steps=0",
        f"optim.lr={o['lr']}",
        f"optim.warmup_steps={o['warmup']}",
        f"optim.weight_decay={o['wd']}",
        f"optim.betas=[{o['beta1']},{o['beta2']}]",
        f"optim.eps={o['eps']}",
        f"optim.grad_clip={o['clip']}",
        "optim.min_lr_ratio=0.0",
        f"deepspeed.zero_stage={spec.zero}",
        "deepspeed.precision=fp32",
        "eval.at_start=false",
        "eval.every_epochs=0",
        "run.log_every=1",
        "run.verify_export=false",
        "checkpoint.at_epoch_end=true",
    ]


def openclip_command(spec: Spec, python: Path, models: Models, manifest: Path, run_dir: Path) -> list[str]:
    """torchrun running this file as open_clip's launcher. open_clip's options travel in a JSON file:
    torchrun's parser takes abbreviations even after the script (`--logs` is ambiguous to it)."""
    pattern, samples = shard_pattern(manifest)
    o = OPTIM
    options = [
        f"--model=local-dir:{models.openclip}",
        f"--train-data={pattern}",
        f"--train-num-samples={samples}",
        "--dataset-type=webdataset",
        f"--batch-size={BATCH}",
        "--workers=1",
        "--precision=fp32",
        "--device=cpu",
        f"--lr={o['lr']}",
        f"--warmup={o['warmup']}",
        f"--wd={o['wd']}",
        f"--beta1={o['beta1']}",
        f"--beta2={o['beta2']}",
        f"--eps={o['eps']}",
        f"--grad-clip-norm={o['clip']}",
        "--gather-with-grad",  # and no --local-loss: the loss over the whole global batch, like ours
        "--epochs=1",
        "--lr-scheduler=cosine",
        "--log-every-n-steps=1",
        "--report-to=tensorboard",
        f"--logs={run_dir.parent}",
        f"--name={run_dir.name}",
        "--seed=0",
    ]
    args = run_dir.parent / f"{run_dir.name}.openclip-args.json"
    args.write_text(json.dumps(options, indent=1) + "\n")
    return [*torchrun(python, spec.procs), str(Path(__file__).resolve()), WORKER, str(args)]


MEMORY = {"VmRSS": "rss", "RssAnon": "anon"}  # /proc/PID/status fields → our names


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and RssAnon of a process (its private, anonymous share: file-backed pages of the same
    shared libraries count differently from one install to another), in MB; {} once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    kb = {
        k: float(v.split()[0])
        for k, _, v in (line.partition(":") for line in status.splitlines())
        if k in MEMORY
    }
    return {MEMORY[k]: v / 1024 for k, v in kb.items()}


class MemorySampler:
    """Peak memory of every process under a torchrun agent: its children are the trainers, their forks
    the loader workers (every RSS_EVERY_S; a zombie's 0 is not a reading)."""

    def __init__(self, agent: int) -> None:
        self.agent = agent
        self.trainers: dict[int, dict[str, float]] = {}
        self.loaders: dict[int, dict[str, float]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        import psutil

        try:
            agent = psutil.Process(self.agent)
        except psutil.NoSuchProcess:
            return
        while not self.stop.is_set():
            try:
                for trainer in agent.children():
                    self._take(self.trainers, trainer.pid)
                    command = trainer.cmdline()
                    for child in trainer.children(recursive=True):
                        if child.cmdline() == command:  # forked: a loader worker, not a helper tool
                            self._take(self.loaders, child.pid)
            except psutil.Error:
                pass
            self.stop.wait(RSS_EVERY_S)

    @staticmethod
    def _take(peaks: dict[int, dict[str, float]], pid: int) -> None:
        now = memory_mb(pid)
        if now.get("rss"):
            old = peaks.setdefault(pid, {})
            for key, mb in now.items():
                old[key] = max(old.get(key, 0.0), mb)

    def finish(self) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
        self.stop.set()
        self.thread.join()
        return list(self.trainers.values()), list(self.loaders.values())


def import_memory(python: Path | str) -> dict[str, float]:
    """Memory of a process that has only imported torch: the same torch build in both environments,
    so a difference is how their library files map, not either trainer's doing."""
    code = (
        "import torch, json, re\n"
        "status = open('/proc/self/status').read()\n"
        "print(json.dumps({k: int(re.search(k + r':\\s+(\\d+)', status).group(1)) / 1024 for k in ('VmRSS', 'RssAnon')}))"
    )
    done = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, env=run_env(), cwd=Path(python).parents[1]
    )
    if done.returncode != 0:
        return {}
    return {MEMORY[k]: v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def scalars(folder: Path, tag: str) -> list[tuple[int, float, float]]:
    """(step, wall time, value) of one TensorBoard tag, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        raise SystemExit(f"{folder}: no {tag!r} in the TensorBoard log (tags: {acc.Tags().get('scalars')})")
    return sorted((e.step, e.wall_time, e.value) for e in acc.Scalars(tag))


# Where each side writes TensorBoard, the tag logged every step, and the step its first event carries
# (this harness counts optimizer steps from 1; open_clip's `step` is the 0-based batch index).
TB = {
    "harness": ("tensorboard", "perf/samples_per_s", 1),
    "open_clip": ("tensorboard", "train/samples_per_second", 0),
}


class RunFailed(Exception):
    """A run that exited badly or logged too few steps (the message says which, and where its log is)."""


def measure(spec: Spec, cmd: list[str], run_dir: Path, logs: Path, expected_steps: int) -> Measured:
    """Launch, sample RSS until exit, then read the run's TensorBoard log."""
    log = logs / f"{spec.name}.log"
    with open(log, "w") as out:
        start = time.time()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=run_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        sampler = MemorySampler(proc.pid)
        try:
            rc = proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            rc = proc.wait()
        end = time.time()
        trainers, loaders = sampler.finish()
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise RunFailed(f"{spec.name} exited {rc}; its log: {log}\n{tail}")
    sub, tag, first = TB[spec.side]
    events = scalars(run_dir / sub, tag)
    done = {step - first + 1: wall for step, wall, _ in events}  # steps completed → when
    last = max(done)
    if last != expected_steps or STEADY_FROM not in done:
        raise RunFailed(f"{spec.name}: its log ends at step {last} of {expected_steps}; see {log}")
    losses = scalars(run_dir / sub, "train/loss")
    return Measured(
        spec,
        samples_per_s=BATCH * spec.procs * (last - STEADY_FROM) / (done[last] - done[STEADY_FROM]),
        wall_s=end - start,
        to_step5_s=done[STEADY_FROM] - start,
        tail_s=end - done[last],
        steps=last,
        rss_mb=sorted(t["rss"] for t in trainers),
        anon_mb=sorted(t.get("anon", 0.0) for t in trainers),
        loader_rss_mb=sorted(t["rss"] for t in loaders),
        loss_first=losses[0][2],
        loss_end=statistics.fmean(v for _, _, v in losses[-LOSS_END:]),
    )


def schedule(rounds: int, procs: list[int]) -> list[Spec]:
    """Strict alternation: in every round, for each process count, this harness at ZeRO-0, open_clip,
    this harness at ZeRO-2, open_clip."""
    return [
        Spec(side, p, zero, r)
        for r in range(1, rounds + 1)
        for p in procs
        for side, zero in (("harness", 0), ("open_clip", -1), ("harness", 2), ("open_clip", -1))
    ]


# --------------------------------------------------------------------------- the table


def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _span(values: list[float], fmt: str) -> str:
    return f"{min(values):{fmt}}–{max(values):{fmt}}" if values else "-"


def rows(results: list[Measured], procs: list[int]) -> list[dict[str, Any]]:
    """One row per (processes, ZeRO stage): medians of both sides, their ratio, and the median of the
    ratios of each harness run to the open_clip run right after it."""
    out = []
    for p in procs:
        peers = [m for m in results if m.spec.side == "open_clip" and m.spec.procs == p]
        for z in (0, 2):
            ours = [m for m in results if m.spec.side == "harness" and m.spec.procs == p and m.spec.zero == z]
            pairs = [(m, _next_peer(results, m)) for m in ours]
            row: dict[str, Any] = {"procs": p, "zero": z, "runs": [len(ours), len(peers)]}
            for key in ("samples_per_s", "wall_s", "to_step5_s", "tail_s"):
                a, b = _med([getattr(m, key) for m in ours]), _med([getattr(m, key) for m in peers])
                paired = _med([getattr(m, key) / getattr(q, key) for m, q in pairs if q])
                row[key] = {"harness": a, "open_clip": b, "ratio": a / b, "paired": paired}
            for key in ("rss_mb", "anon_mb"):  # the highest trainer process of each run
                a, b = [max(getattr(m, key)) for m in ours], [max(getattr(m, key)) for m in peers]
                paired = _med([max(getattr(m, key)) / max(getattr(q, key)) for m, q in pairs if q])
                row[f"peak_{key}"] = {
                    "harness": a,
                    "open_clip": b,
                    "ratio": _med(a) / _med(b),
                    "paired": paired,
                }
            out.append(row)
    return out


def _next_peer(results: list[Measured], m: Measured) -> Measured | None:
    later = results[next(i for i, r in enumerate(results) if r is m) + 1 :]
    return next((q for q in later if q.spec.side == "open_clip" and q.spec.procs == m.spec.procs), None)


def targets(table: list[dict[str, Any]]) -> list[Target]:
    from bench.common import Target

    out = []
    for r in table:
        label = _label(r)
        out.append(Target(f"{label}: samples/s", r["samples_per_s"]["ratio"], 1.2))
        out.append(Target(f"{label}: wall time", r["wall_s"]["ratio"], 1.0, at_least=False))
        out.append(Target(f"{label}: peak RSS", r["peak_rss_mb"]["ratio"], 1.0, at_least=False))
    return out


SECTIONS = (
    ("samples_per_s", "steady samples/s", ".0f"),
    ("wall_s", "wall time of the whole run (s)", ".1f"),
    ("to_step5_s", "  of it: launch to step 5 (s)", ".1f"),
    ("tail_s", "  of it: last step to exit (s)", ".1f"),
)


def render(table: list[dict[str, Any]], results: list[Measured], models: Models, header: str) -> str:
    """The issue's side-by-side table: a section per measure, a line per row."""
    lines = [header, f"  {'':34s} {'this harness':>13s} {'open_clip':>11s}   ratio (paired)"]
    for key, title, fmt in SECTIONS:
        lines.append(f"  {title}")
        for r in table:
            v = r[key]
            lines.append(
                f"    {_label(r):32s} {v['harness']:13{fmt}} {v['open_clip']:11{fmt}}"
                f"   {v['ratio']:.2f} ({v['paired']:.2f})"
            )
    for key, title in (("rss", "peak RSS"), ("anon", "  of it anonymous (RssAnon)")):
        lines.append(f"  {title} per trainer process (MB): lowest-highest run")
        for r in table:
            m = r[f"peak_{key}_mb"]
            lines.append(
                f"    {_label(r):32s} {_span(m['harness'], '.0f'):>13s} {_span(m['open_clip'], '.0f'):>11s}"
                f"   {m['ratio']:.2f} ({m['paired']:.2f})"
            )
    lines.append(f"  loss at the first step -> mean of the last {LOSS_END} (medians); loader worker peak RSS")
    for side in ("harness", "open_clip"):
        for p in sorted({m.spec.procs for m in results}):
            ms = [m for m in results if m.spec.side == side and m.spec.procs == p]
            loaders = _span([x for m in ms for x in m.loader_rss_mb], ".0f")
            lines.append(
                f"    {side:10s} {p} process{'es' if p > 1 else ''}: {_med([m.loss_first for m in ms]):.2f}"
                f" -> {_med([m.loss_end for m in ms]):.2f}; loader {loaders} MB"
            )
    lines.append(
        f"  parameters: this harness {models.hf_params:,} + its heads, open_clip {models.openclip_params:,}"
    )
    return "\n".join(lines)


def _label(r: dict[str, Any]) -> str:
    return f"{r['procs']} process{'es' if r['procs'] > 1 else ''}, ZeRO-{r['zero']}"


# --------------------------------------------------------------------------- main


def openclip_worker(argv: list[str]) -> None:
    """open_clip_train.main on the CPU, one process of a torchrun job. open_clip wraps its model as
    DistributedDataParallel(model, device_ids=[device]), which PyTorch refuses for a CPU module
    (device_ids only apply to single-device GPU modules); this subclass drops them on the CPU and
    changes nothing else, without touching open_clip's files. isinstance checks still hold."""
    here = str(Path(__file__).resolve().parent)  # run as a script: bench/'s modules must not shadow any
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != here]
    import torch
    from open_clip_train.main import main as openclip_main

    class CpuDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module: Any, device_ids: Any = None, **kwargs: Any) -> None:
            on_cpu = all(torch.device(d).type == "cpu" for d in device_ids or [])
            super().__init__(module, device_ids=None if on_cpu else device_ids, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuDDP  # type: ignore[misc]
    if openclip_main(argv) == -1:  # open_clip returns -1 (and exit status 0) for some refusals
        raise SystemExit("open_clip_train.main refused to run (see its message above)")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="rounds of strictly alternating runs (default 3)")
    p.add_argument("--quick", action="store_true", help="smoke test: 768 samples, 1 round, no warm-up runs")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts (default 1 2)")
    p.add_argument(
        "--venv",
        type=Path,
        default=ROOT / ".venv-peer",
        help="open_clip's environment (default .venv-peer/, made once)",
    )
    p.add_argument("--out", default="", help="results file (default bench/results/peer_openclip-<cpu>.json)")
    args = p.parse_args(argv)
    if args.repeat < 1 or any(n not in (1, 2, 4) for n in args.procs):
        p.error("--repeat must be at least 1 and --procs among 1, 2, 4 (four shards)")
    return args


def run_all(specs: list[Spec], python: Path, models: Models, manifest: Path, work: Path) -> list[Measured]:
    """Each run in order, one at a time; a round-0 run is a warm-up, printed but not kept."""
    samples = shard_pattern(manifest)[1]
    results = []
    for i, spec in enumerate(specs, 1):
        m = run_once(spec, python, models, manifest, work, samples // (BATCH * spec.procs))
        print(
            f"[{i}/{len(specs)}] {spec.name:24s} {m.samples_per_s:6.0f} samples/s  wall {m.wall_s:5.1f} s"
            f"  peak RSS {max(m.rss_mb):5.0f} MB  loss {m.loss_first:.2f} -> {m.loss_end:.2f}",
            flush=True,
        )
        if spec.round:
            results.append(m)
    return results


def run_once(spec: Spec, python: Path, models: Models, manifest: Path, work: Path, steps: int) -> Measured:
    """One run, redone once if it fails (gloo jobs on CPU sometimes abort at exit, "terminate called
    without an active exception", after good work: shared/notes/stack-on-cpu.md)."""
    try:
        return attempt(spec, python, models, manifest, work, steps)
    except RunFailed as err:
        print(f"{str(err).splitlines()[0]}: redoing it once", flush=True)
    try:
        m = attempt(spec, python, models, manifest, work, steps)
    except RunFailed as err:
        raise SystemExit(f"{err}\n(failed twice)") from None
    m.attempts = 2
    return m


def attempt(spec: Spec, python: Path, models: Models, manifest: Path, work: Path, steps: int) -> Measured:
    """One run in a fresh folder, removed afterwards (checkpoints and exports: tens of MB a run; the
    console log stays in <work>/logs)."""
    run_dir = work / "runs" / spec.name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = (
        harness_command(spec, models, manifest, run_dir)
        if spec.side == "harness"
        else openclip_command(spec, python, models, manifest, run_dir)
    )
    m = measure(spec, cmd, run_dir, work / "logs", steps)
    shutil.rmtree(run_dir)
    return m


def peer_versions(python: Path) -> dict[str, str]:
    """What open_clip's environment holds, for the results file."""
    code = (
        "import json; from importlib import metadata as m\n"
        "print(json.dumps({n: m.version(n) for n in ('open_clip_torch', 'torch', 'torchvision', 'webdataset', 'timm')}))"
    )
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=python.parents[1])
    return json.loads(done.stdout) if done.returncode == 0 else {}


def differences(ours: dict[str, str], peer: dict[str, str], venv: Path) -> list[str]:
    """NOT_HELD, and the versions that differ between the two environments."""
    out = [
        *NOT_HELD,
        f"webdataset: {ours['webdataset']} here, {peer.get('webdataset')} for open_clip (its training extra"
        " asks <=0.2.86: its tar reader needs 0.2's samples)",
    ]
    if peer.get("torch") != ours["torch"]:
        out.append(f"torch: {ours['torch']} here, {peer.get('torch')} in {venv}")
    return out


def report(
    args: argparse.Namespace, results: list[Measured], models: Models, python: Path, work: Path
) -> None:
    """Print the table with its targets and what was not held constant; write the results file."""
    from bench.common import machine, slug, versions, write_results

    samples, rounds = results[0].steps * BATCH * results[0].spec.procs, max(m.spec.round for m in results)
    table, peer = rows(results, args.procs), peer_versions(python)
    goals = targets(table)
    memory = {"harness": import_memory(sys.executable), "open_clip": import_memory(python)}
    not_held = differences(versions(), peer, args.venv)
    header = (
        f"this harness against open_clip {peer.get('open_clip_torch')}: tiny CLIP, {samples:,} samples (one epoch),"
        f" batch {BATCH}/process, fp32, 1 loader worker, OMP_NUM_THREADS=1; medians of {rounds} round(s),"
        f" steady = steps {STEADY_FROM}..last"
    )
    h, o = memory["harness"], memory["open_clip"]
    text = "\n".join(
        [
            render(table, results, models, header),
            f"  import torch alone, the same build: RSS {h.get('rss', 0):.0f} MB (anon {h.get('anon', 0):.0f}) in"
            f" .venv, {o.get('rss', 0):.0f} MB (anon {o.get('anon', 0):.0f}) in {args.venv.name}; the difference is"
            " file-backed pages of identical libraries, neither trainer's doing",
            "targets, this harness / open_clip (medians):",
            *[t.line() for t in goals],
            "not held constant:",
            *[f"  - {line}" for line in not_held],
        ]
    )
    print(text)
    payload = {
        "quick": args.quick,
        "samples": samples,
        "rounds": rounds,
        "rows": table,
        "runs": [{**asdict(m.spec), **{k: v for k, v in asdict(m).items() if k != "spec"}} for m in results],
        "import_torch_memory_mb": memory,
        "held": {"batch": BATCH, "optim": OPTIM, "shape": asdict(Shape()), "steady_from": STEADY_FROM},
        "not_held": not_held,
        "peer": {"venv": str(args.venv), "versions": peer},
    }
    name = f"peer_openclip-{slug(machine()['cpu'])}"
    out = args.out or (str(work / f"{name}.json") if args.quick else "")  # a smoke test is no result
    print(f"wrote {write_results(name, payload, goals, text, out)}")


def main(argv: list[str]) -> None:
    args = parse(argv)
    samples, rounds = (768, 1) if args.quick else (2048, args.repeat)
    tag = "peer_openclip" + ("-quick" if args.quick else "")
    work = ROOT / "runs" / tag
    (work / "logs").mkdir(parents=True, exist_ok=True)
    python = peer_python(args.venv.resolve())
    manifest = prepare_shards(ROOT / "data" / tag, samples)
    models = build_models(Shape(), python, work / "models")
    specs = schedule(rounds, args.procs)
    if not args.quick:  # one untimed pair first: page cache, JIT-built extensions, .pyc files
        specs = [Spec("harness", 1, 2, 0), Spec("open_clip", 1, -1, 0), *specs]
    results = run_all(specs, python, models, manifest, work)
    report(args, results, models, python, work)


if __name__ == "__main__":
    if sys.argv[1:2] == [WORKER]:
        openclip_worker(json.loads(Path(sys.argv[2]).read_text()))
    else:
        main(sys.argv[1:])
