"""Every knob of a run, with its meaning, and the typed views the library is built from.

Config files (``configs/*.py``) start from ``base_config()`` and override what differs; the
library never reads a key that is not defined here (``lock_config`` turns a typo on the
command line into an error naming the key). ``validate`` checks cross-field consistency and
names the offending field.
"""

from __future__ import annotations

import ml_collections

from ppow_jax import engine, rollout, train_step
from ppow_jax.errors import UserError
from ppow_jax.models import llama

STAGES = ("target", "baseline", "ppow", "continued", "eval")


def _optim(lr: float, warmup: int, decay: int) -> ml_collections.ConfigDict:
  o = ml_collections.ConfigDict()
  o.learning_rate = lr  # peak learning rate (AdamW)
  o.warmup_steps = warmup  # linear warmup steps
  o.decay_steps = decay  # cosine decay steps after warmup
  o.end_lr_fraction = 0.1  # final lr = fraction * peak
  o.b1 = 0.9  # AdamW beta1
  o.b2 = 0.95  # AdamW beta2 (EAGLE-3's)
  o.weight_decay = 0.0  # AdamW decoupled weight decay
  o.grad_clip = 0.5  # global-norm gradient clipping
  return o


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # everything random derives from this
  c.stages = ",".join(STAGES)  # comma-separated subset of: target,baseline,ppow,continued,eval

  # --- Data ---
  c.data = ml_collections.ConfigDict()
  c.data.corpus = "stdlib"  # "stdlib" (this Python's own sources), a directory or a glob
  c.data.include = "*.py"  # file pattern inside a corpus directory
  c.data.exclude = ("site-packages", "test", "tests", "idlelib", "lib2to3")  # dirs to skip
  c.data.conversations = ""  # JSONL (ShareGPT or messages) file/glob; replaces the corpus
  c.data.skip_bad_lines = False  # malformed JSONL lines: skip with a warning, or fail
  c.data.tfds_name = ""  # an already prepared TFDS dataset (name) instead of the above
  c.data.tfds_data_dir = ""  # where tfds_name is prepared ("" = <workdir>/tfds)
  c.data.heldout_fraction = 0.05  # files held out for evaluation prompts
  c.data.tokenizer = ""  # tokenizer.json / HF dir; "" = the target's, or train a BPE here
  c.data.tokenizer_vocab_size = 1024  # size of the BPE trained here (embedded default)
  c.data.tokenizer_train_docs = 400  # documents the BPE is trained on
  c.data.seq_len = 128  # tokens per packed training sequence
  c.data.regenerate = False  # regenerate assistant turns with the target before training
  c.data.regenerate_max_new_tokens = 256  # cap per regenerated turn
  c.data.regenerate_batch_size = 16  # prompts answered per batched greedy call
  c.data.instructions = ""  # "stdlib" | a prompts JSONL: requests the target answers (self-distilled)
  c.data.num_instructions = 800  # training instructions drawn (train modules/lines only)
  c.data.heldout_instructions = 32  # held-out instructions (evaluation prompts when no file)
  c.data.cache_dir = ""  # regenerated answers and target features ("" = <workdir>/cache)

  # --- Target (frozen during drafter training) ---
  c.target = ml_collections.ConfigDict()
  c.target.hf_dir = ""  # local HF directory; "" = pretrain the embedded tiny target here
  c.target.preset = ""  # named architecture (ppow_jax/models/presets.py) for shape tools
  c.target.dtype = "float32"  # compute dtype
  c.target.param_dtype = "float32"  # storage dtype
  c.target.hidden_size = 128  # embedded target only: width
  c.target.intermediate_size = 384  # embedded target only: MLP width
  c.target.num_layers = 4  # embedded target only: depth
  c.target.num_heads = 4  # embedded target only: query heads
  c.target.num_kv_heads = 2  # embedded target only: key/value heads (GQA)
  c.target.rope_theta = 10000.0  # embedded target only: RoPE base
  c.target.max_position_embeddings = 1024  # embedded target only: context
  c.target.pretrain_steps = 500  # embedded target only: LM pretraining steps
  c.target.pretrain_batch_size = 16  # embedded target only: sequences per step
  c.target.sample_tokens = 48  # embedded target only: greedy sample length for the report
  c.target.optim = _optim(6e-3, 30, 500)

  # --- Drafter ---
  c.drafter = ml_collections.ConfigDict()
  c.drafter.kind = "eagle3"  # "eagle3" (target features) | "lm" (independent small LM)
  c.drafter.init_from = ""  # EAGLE-3 or HF LM directory to start from ("" = random init)
  c.drafter.preset = ""  # kind="lm": named architecture for shape tools
  c.drafter.draft_vocab_size = 0  # eagle3: reduced draft vocab (0 = the target's)
  c.drafter.hidden_size = 0  # 0 = the target's hidden size (eagle3) / half of it (lm)
  c.drafter.intermediate_size = 0  # 0 = the target's
  c.drafter.num_layers = 1  # kind="lm" only: depth
  c.drafter.dtype = "float32"  # compute dtype
  c.drafter.param_dtype = "float32"  # master weights
  c.drafter.norm_before_fc = True  # eagle3: RMSNorm the fused target features before fc
  c.drafter.head_from_target = False  # eagle3: lm_head/norm start as the target's (kept rows)

  # --- Token-level baseline (EAGLE-3 training-time test) ---
  c.baseline = ml_collections.ConfigDict()
  c.baseline.steps = 150  # optimizer steps
  c.baseline.batch_size = 8  # sequences per step
  c.baseline.divergence = "forward_kl"  # forward_kl | reverse_kl | jsd | tv | neg_log_alpha
  c.baseline.ttt_steps = 3  # unrolled steps S (EAGLE-3 uses 7; 3 keeps the CPU demo short)
  c.baseline.step_decay = 0.8  # weight of step i is decay**i
  c.baseline.feature_cache = True  # eagle3: target features computed once, reused every epoch
  c.baseline.feature_rows = 0  # rows with cached features (0 = steps * batch, at most an epoch)
  c.baseline.feature_dtype = "float16"  # storage dtype of cached features
  c.baseline.support_only = False  # renormalise the target on the draft vocab (EAGLE-3's loss)
  c.baseline.optim = _optim(3e-3, 20, 150)

  # --- PPOW (starts from the baseline drafter) ---
  c.ppow = ml_collections.ConfigDict()
  c.ppow.steps = 60  # optimizer steps (each: one rollout, ppo_epochs updates)
  c.ppow.batch_size = 4  # sequences per step
  c.ppow.window = 6  # K: tokens per sampled window
  c.ppow.group_size = 8  # G: windows per start (advantages standardised within)
  c.ppow.starts_per_seq = 4  # ADAW: window starts chosen per sequence
  c.ppow.gamma = 0.1  # drafter/target cost ratio for the speed reward; -1 = measure here
  c.ppow.speed_form = "committed_per_cost"  # (a+1)/(1+γK) | "paper_summary": a/(aγ+1)
  c.ppow.use_speed = True  # ablation: Cost-Aware Speedup Reward on/off
  c.ppow.use_prox = True  # ablation: Distribution-Based Proximity Reward on/off
  c.ppow.prox_form = "expected_length"  # Σ_k Π α_i | "indicator": η·1[Δ<ε]
  c.ppow.lambda_prox = 1.0  # weight of the proximity reward
  c.ppow.prox_eta = 1.0  # indicator form: reward value
  c.ppow.prox_eps = 1.0  # indicator form: log-prob gap threshold
  c.ppow.selection = "topk"  # ADAW selection: topk | softmax | uniform (ablation)
  c.ppow.selection_temperature = 1.0  # softmax selection temperature
  c.ppow.clip_eps = 0.2  # PPO clip ε
  c.ppow.ratio = "token"  # PPO ratio: token | geometric_mean (GTO)
  c.ppow.omega = 0.5  # weight of the target-anchored token loss
  c.ppow.anchor_divergence = "forward_kl"  # divergence of that anchor
  c.ppow.ppo_epochs = 2  # updates per rollout
  c.ppow.adv_delta = 1e-6  # δ in the group standardisation
  c.ppow.optim = _optim(3e-4, 10, 60)

  # --- Continued-baseline control ---
  c.continued = ml_collections.ConfigDict()
  c.continued.enabled = True  # train the baseline on for PPOW's data budget (same sequences)
  c.continued.optim = _optim(3e-4, 10, 60)  # same schedule shape as PPOW's

  # --- Evaluation (PROTOCOL.md's unified protocol) ---
  c.eval = ml_collections.ConfigDict()
  c.eval.prompts_file = ""  # JSONL (prompt / conversations / messages); "" = held-out split
  c.eval.num_prompts = 16  # prompts evaluated
  c.eval.prompt_len = 48  # held-out prompts: tokens of context; files: max (longer truncate)
  c.eval.prompt_policy = "truncate_left"  # longer prompts: "truncate_left" (warn) | "reject"
  c.eval.max_new_tokens = 64  # new tokens per prompt
  c.eval.temperatures = (0.0, 1.0)  # decoding temperatures
  c.eval.window = 4  # K at evaluation
  c.eval.batch_sizes = (1, 8)  # 1 = the speedup protocol; >1 = batched throughput
  c.eval.repeats = 3  # timed runs; speedups use the median
  c.eval.eos = True  # stop at the tokenizer's EOS

  # --- Mesh and sharding (see docs/scale_out.md) ---
  c.mesh = ml_collections.ConfigDict()
  c.mesh.axes = ("data", "fsdp", "tensor")  # mesh axis names
  c.mesh.ici_shape = (-1, 1, 1)  # within a slice; one -1 = the remaining devices
  c.mesh.dcn_shape = (1, 1, 1)  # across slices
  c.mesh.num_devices = -1  # devices the mesh uses (-1 = all; the CPU smoke test uses 1)
  c.sharding = ml_collections.ConfigDict()
  c.sharding.weight_rules = (("vocab", "tensor"), ("embed", "fsdp"), ("mlp", "tensor"),
                             ("heads", "tensor"), ("kv_heads", "tensor"), ("head_dim", None))
  c.sharding.activation_rules = (("batch", ("data", "fsdp")), ("length", None), ("embed", None),
                                 ("heads", "tensor"), ("kv_heads", "tensor"),
                                 ("head_dim", None), ("mlp", "tensor"), ("vocab", "tensor"))
  c.sharding.drafter_params = "replicated"  # "fsdp" | "replicated"

  # --- Shapes read by the memory plan ---
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 8  # global sequences per drafter step (memory plan)
  c.train.seq_len = 128  # tokens per sequence (memory plan)
  c.decode = ml_collections.ConfigDict()
  c.decode.window = 4  # K (memory plan)
  c.decode.max_new_tokens = 64  # (memory plan)
  c.decode.batch_size = 1  # (memory plan)

  # --- Checkpoints and logging ---
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.save_every = 50  # steps between checkpoints
  c.checkpoint.max_to_keep = 2  # latest checkpoints kept (plus the best by eval τ)
  c.checkpoint.eval_every = 50  # steps between held-out greedy τ checks (best/); 0 = off
  c.checkpoint.eval_prompts = 8  # held-out prompts in that check
  c.log_every = 10  # steps between console/TensorBoard lines
  return c


def stages(c) -> tuple[str, ...]:
  chosen = tuple(s.strip() for s in c.stages.split(",") if s.strip())
  for s in chosen:
    if s not in STAGES:
      raise UserError(f"config.stages: unknown stage {s!r}; expected some of {STAGES}")
  return chosen


def optim_config(o) -> train_step.OptimConfig:
  return train_step.OptimConfig(**o.to_dict())


def baseline_config(c) -> train_step.BaselineConfig:
  b = c.baseline
  return train_step.BaselineConfig(b.divergence, b.ttt_steps, b.step_decay)


def ppow_config(c, gamma: float) -> rollout.PPOWConfig:
  p = c.ppow
  return rollout.PPOWConfig(
      window=p.window, group_size=p.group_size, starts_per_seq=p.starts_per_seq, gamma=gamma,
      speed_form=p.speed_form, use_speed=p.use_speed, use_prox=p.use_prox,
      prox_form=p.prox_form, lambda_prox=p.lambda_prox, prox_eta=p.prox_eta,
      prox_eps=p.prox_eps, selection=p.selection,
      selection_temperature=p.selection_temperature, clip_eps=p.clip_eps, ratio=p.ratio,
      omega=p.omega, anchor_divergence=p.anchor_divergence, ppo_epochs=p.ppo_epochs,
      adv_delta=p.adv_delta)


def embedded_target_config(c, vocab_size: int) -> llama.ModelConfig:
  t = c.target
  return llama.ModelConfig(
      vocab_size=vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
      num_layers=t.num_layers, num_heads=t.num_heads, num_kv_heads=t.num_kv_heads,
      rope_theta=t.rope_theta, max_position_embeddings=t.max_position_embeddings,
      tie_embeddings=False, dtype=t.dtype, param_dtype=t.param_dtype)


def decode_config(c, temperature: float, eos_ids: tuple) -> engine.DecodeConfig:
  return engine.DecodeConfig(window=c.eval.window, temperature=temperature,
                             max_new_tokens=c.eval.max_new_tokens, eos_ids=eos_ids)


def validate(c) -> None:
  """Cross-field checks; each error names the field."""
  stages(c)
  if c.drafter.kind not in ("eagle3", "lm"):
    raise UserError(f"config.drafter.kind must be 'eagle3' or 'lm', got {c.drafter.kind!r}")
  if c.data.seq_len < 8:
    raise UserError(f"config.data.seq_len must be >= 8, got {c.data.seq_len}")
  for name in ("baseline", "ppow"):
    if c[name].steps < 0 or c[name].batch_size < 1:
      raise UserError(f"config.{name}: steps must be >= 0 and batch_size >= 1")
  baseline_config(c)
  ppow_config(c, max(c.ppow.gamma, 0.0))
  if c.ppow.gamma < 0 and c.ppow.gamma != -1:
    raise UserError(f"config.ppow.gamma must be >= 0, or -1 to measure; got {c.ppow.gamma}")
  if c.ppow.starts_per_seq > c.data.seq_len - 2:
    raise UserError(f"config.ppow.starts_per_seq={c.ppow.starts_per_seq} exceeds the "
                    f"candidate starts of a sequence (data.seq_len - 2 = {c.data.seq_len - 2})")
  if c.eval.window < 1:
    raise UserError(f"config.eval.window must be >= 1, got {c.eval.window}")
  if any(t < 0 for t in c.eval.temperatures):
    raise UserError(f"config.eval.temperatures must be >= 0, got {c.eval.temperatures}")
  if c.eval.repeats < 1 or c.eval.num_prompts < 1:
    raise UserError("config.eval.repeats and config.eval.num_prompts must be >= 1")
  if c.eval.prompt_policy not in ("truncate_left", "reject"):
    raise UserError(f"config.eval.prompt_policy must be truncate_left or reject, got "
                    f"{c.eval.prompt_policy!r}")
  if not c.target.hf_dir and c.target.hidden_size % c.target.num_heads:
    raise UserError("config.target.hidden_size must be divisible by config.target.num_heads")


def real_run_config(preset: str, variant: str, tensor: int) -> ml_collections.ConfigDict:
  """Shared recipe of the real-target configs (EAGLE-3 drafter, ShareGPT-style data).

  ``variant``: "tpu_v5p" | "gpu_8xh100" | "runlocal" (the tiny preset, for a smoke run).
  ``tensor``: tensor-parallel width of the frozen target (must divide its KV heads).
  """
  if variant not in ("tpu_v5p", "gpu_8xh100", "runlocal"):
    raise ValueError(f"unknown variant {variant!r}; expected tpu_v5p, gpu_8xh100 or runlocal")
  c = base_config()
  c.stages = "baseline,ppow,continued,eval"  # the target is given, not pretrained
  c.target.preset = preset
  c.target.hf_dir = ""  # set on the command line: --config.target.hf_dir=/local/path
  c.target.dtype = c.target.param_dtype = "bfloat16"
  c.data.corpus = ""
  c.data.conversations = ""  # set: --config.data.conversations=/data/sharegpt.jsonl
  c.data.regenerate = True  # drafters trained on the target's own answers accept more
  c.data.seq_len = 2048
  c.drafter.draft_vocab_size = 32000  # EAGLE-3's reduced draft vocabulary
  c.drafter.dtype = "bfloat16"
  c.drafter.param_dtype = "float32"
  c.baseline.steps, c.baseline.batch_size = 20000, 16
  c.baseline.ttt_steps = 7  # EAGLE-3's training-time test
  c.baseline.optim = _optim(1e-4, 500, 20000)
  c.ppow.steps, c.ppow.batch_size = 4000, 16
  c.ppow.window = 10  # K
  c.ppow.gamma = -1  # measure on the hardware at hand
  c.ppow.optim = _optim(5e-6, 100, 4000)  # GTO's learning rate
  c.continued.optim = _optim(5e-6, 100, 4000)
  c.eval.window, c.eval.max_new_tokens, c.eval.batch_sizes = 7, 512, (1, 8)
  c.eval.num_prompts = 80  # e.g. MT-Bench / HumanEval / GSM8K question files
  c.eval.prompt_len = 1024
  c.train.batch_size, c.train.seq_len = 16, 2048
  c.decode.window, c.decode.max_new_tokens = 10, 512
  c.sharding.drafter_params = "fsdp"
  c.mesh.ici_shape = (-1, 1, tensor)
  c.checkpoint.save_every = 500
  c.log_every = 20
  if variant == "gpu_8xh100":
    c.mesh.ici_shape = (8 // tensor, 1, tensor)  # per node, over NVLink
    c.mesh.dcn_shape = (-1, 1, 1)  # nodes: data-parallel
  elif variant == "runlocal":
    c.target.preset = "tiny"
    c.target.dtype = c.target.param_dtype = "float32"
    c.drafter.dtype = "float32"
    c.drafter.draft_vocab_size = 128
    c.mesh.ici_shape = (-1, 1, 1)
    c.train.batch_size, c.train.seq_len = 8, 64
    c.ppow.group_size = c.ppow.window = c.decode.window = 4
    c.decode.max_new_tokens = 16
  return c


def check_runnable(c) -> None:
  """Checks that need the user's paths (a shipped real-run config fails here until set)."""
  if c.target.preset and not c.target.hf_dir and "target" not in stages(c):
    raise UserError(f"config.target.hf_dir: set it to the local Hugging Face directory of "
                    f"{c.target.preset} (nothing is downloaded)")
  if not (c.data.corpus or c.data.conversations or c.data.tfds_name):
    raise UserError("config.data: set one of corpus, conversations (JSONL) or tfds_name")
