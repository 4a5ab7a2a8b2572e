"""Load the tokenizer and the base causal LM: a real checkpoint (local folder or hub id) or the
offline `tiny` model built from a transformers config, optionally warmed up on plain text."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from moelora.atomic import error_words, io_errors
from moelora.config import ModelConfig, TinyModelConfig
from moelora.errors import UserError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load_error(what: str, name: str, key: str, err: BaseException) -> str:
    """Why a model or tokenizer did not load: code of its own that needs trust_remote_code, a
    local path that is a file, a local folder whose files are damaged or missing (with the
    library's own first line), or a hub name that could not be fetched."""
    if "trust_remote_code" in str(err):
        return (
            f"{key}={name} needs its own Python code for the {what} (its config names classes "
            f"that transformers does not have); set model.trust_remote_code=true to run that "
            f"code, if you trust its source."
        )
    path = Path(name)
    if path.is_file():
        return f"{key}={name} is a file; point it at the folder that holds the {what}."
    if path.is_dir():
        return (
            f"could not load the {what} from the folder {name} ({error_words(err)}); it must be "
            f"a complete save_pretrained folder (config.json, tokenizer files, weights), so "
            f"copy or download it again."
        )
    return (
        f"could not load the {what} '{name}' (no local folder of that name and the hub is "
        f"unreachable or the name is wrong); download it on a machine with network "
        f"(`hf download {name} --local-dir DIR`) and set {key}=DIR"
    )


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer, with a pad token (eos if the checkpoint has none) and left padding for
    batched generation; training collation pads explicitly and does not depend on the side."""
    name = cfg.tokenizer or cfg.name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
        raise UserError(_load_error("tokenizer", name, key, err)) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token is None:
        raise UserError(f"the tokenizer '{name}' has no eos token; pick a tokenizer that has one.")
    tokenizer.padding_side = "left"
    return tokenizer


def base_skeleton(cfg: ModelConfig) -> PreTrainedModel | None:
    """The base's modules on the meta device (no weights, no memory), for checks before it
    loads; None for the tiny model or when its config cannot be read (the loader says why)."""
    if cfg.name_or_path == "tiny":
        return None
    remote = cfg.trust_remote_code
    try:
        config = AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=remote)
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config, trust_remote_code=remote)
    except (OSError, ValueError, ImportError):
        return None


def resolve_dtype(name: str, on_cpu: bool) -> torch.dtype:
    """`auto` is fp32 on CPU (bf16 is ~30x slower there) and bf16 on an accelerator."""
    if name == "auto":
        return torch.float32 if on_cpu else torch.bfloat16
    if name not in _DTYPES:
        raise UserError(f"model.dtype='{name}' is unknown; use auto, {', '.join(_DTYPES)}.")
    return _DTYPES[name]


def load_base_model(
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: str,
    on_cpu: bool,
    quantization: str | None = None,
    device: str | torch.device = "cpu",
    compute_dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """The frozen base the adapters go on; `quantization=nf4` loads it in bitsandbytes 4-bit on
    `device` (QLoRA), computing in `compute_dtype`, ready for adapters on top."""
    dtype = resolve_dtype(cfg.dtype, on_cpu)
    if cfg.name_or_path == "tiny":
        model = build_tiny_model(cfg.tiny, tokenizer, Path(cache_dir)).to(dtype)
        if not quantization:
            return model
        with tempfile.TemporaryDirectory() as folder:  # bitsandbytes quantises while loading
            model.save_pretrained(folder)
            return _load(folder, cfg, dtype, quantization, device, compute_dtype)
    return _load(cfg.name_or_path, cfg, dtype, quantization, device, compute_dtype)


def _load(
    name: str,
    cfg: ModelConfig,
    dtype: torch.dtype,
    quantization: str | None,
    device,
    compute_dtype: torch.dtype,
) -> PreTrainedModel:
    kwargs = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if quantization:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
        kwargs["device_map"] = {"": str(device)}
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except io_errors() as err:  # OSError, or safetensors' error on an empty or cut file
        raise UserError(_load_error("model", name, "model.name_or_path", err)) from None
    except ValueError as err:  # e.g. custom code without model.trust_remote_code=true
        if "trust_remote_code" in str(err):
            raise UserError(_load_error("model", name, "model.name_or_path", err)) from None
        raise UserError(f"could not load model '{name}': {err}") from None
    if quantization:  # norms and embeddings in fp32, every base weight frozen (PEFT's recipe)
        from peft import prepare_model_for_kbit_training  # imports bitsandbytes: only here

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_differentiable(model)
    return model


def keep_4bit_differentiable(model: PreTrainedModel) -> None:
    """Keep every 4-bit layer in the layout that training differentiates through.

    On a CPU with AVX512-BF16, bitsandbytes repacks a `Linear4bit` at its first eval-mode forward
    without gradients (scoring before training, the eval loss) into an inference layout: scales
    rounded to bf16 (0.3% off the NF4 weights) and a kernel without autograd, so every later
    training step silently passes no gradient through the base layer to the layers below. A
    QLoRA base is trained and scored as trained, so that repacking is turned off (GPUs never
    repack)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def tiny_config(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase):
    """The transformers config of the tiny model (its schema has checked the architecture)."""
    return AutoConfig.for_model(
        cfg.architecture,
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )


def _fingerprint(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase) -> str:
    """Identifies a warmed-up tiny model: its config, the vocabulary and the warm-up text."""
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    for name in cfg.pretrain_files:
        digest.update(Path(name).read_bytes())
    return digest.hexdigest()[:16]


def build_tiny_model(
    cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerBase, cache_dir: Path
) -> PreTrainedModel:
    """A seeded random model; with `pretrain_steps` it is warmed up once and cached on disk."""
    for name in cfg.pretrain_files:
        if not Path(name).is_file():
            raise UserError(
                f"model.tiny.pretrain_files names '{name}', which does not exist; fix the path."
            )
    cached = cache_dir / "tiny" / _fingerprint(cfg, tokenizer)
    if cfg.pretrain_steps and (cached / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(tiny_config(cfg, tokenizer))
        if cfg.pretrain_steps:
            _warm_up(model, cfg, tokenizer)
            # A private temp folder and a tolerant rename: parallel sweep jobs or ranks may
            # warm up the same model at once; the first to finish publishes it.
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f"{cached.name}.tmp", dir=cached.parent))
            model.save_pretrained(tmp)
            try:
                tmp.rename(cached)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
    return model


def _read_texts(files: list[str]) -> list[str]:
    """Plain text for the warm-up: the `input` field of JSONL rows, or the lines of text files."""
    texts: list[str] = []
    for name in files:
        with open(name, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    texts.append(json.loads(line)["input"] if name.endswith(".jsonl") else line)
    return texts


def _warm_up(model: PreTrainedModel, cfg: TinyModelConfig, tokenizer) -> None:
    """Full-parameter language modelling on the warm-up text (no task answers)."""
    texts = _read_texts(cfg.pretrain_files)
    if not texts:
        raise UserError("model.tiny.pretrain_steps > 0 needs text in model.tiny.pretrain_files.")
    generator = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / cfg.pretrain_steps))
    )
    model.train()
    for _ in tqdm(range(cfg.pretrain_steps), desc="warming up the tiny base model"):
        pick = torch.randint(len(texts), (cfg.pretrain_batch_size,), generator=generator)
        batch = tokenizer(
            [texts[i] for i in pick.tolist()],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=cfg.max_position_embeddings,
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
