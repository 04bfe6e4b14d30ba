"""The recipe every config file starts from: each knob once, with its meaning (imports no JAX).

A config file (``configs/*.py``) calls ``base_config()`` and overrides what differs; the
text after the colon (``--config=configs/default.py:smoke,lm``) reaches ``get_config(arg)``
and ``parse_arg`` turns it into named options (big_vision's convention). The library checks
every value before any work (``ppow_jax/settings.py``); a key that is not defined here is an
error naming its dotted path. The quantities and objectives the knobs refer to are defined in
docs/protocol.md, which also says which defaults are the PPOW paper's and which are ours.
"""

from __future__ import annotations

import ml_collections

STAGES = "target,baseline,ppow,continued,eval"  # the order they run in (ppow_jax/stages.py)


def optim(lr: float, warmup: int, decay: int) -> ml_collections.ConfigDict:
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
  c.stages = STAGES  # comma-separated subset of: target,baseline,ppow,continued,eval

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
  c.data.self_instructions = 0  # requests the target writes itself (Magpie-style), then answers
  c.data.self_instruct_temperature = 1.0  # sampling temperature of those requests
  c.data.self_instruct_max_tokens = 96  # cap per request (cut ones are dropped)
  c.data.cache_dir = ""  # regenerated answers and target features ("" = <workdir>/cache)

  # --- Target (frozen during drafter training) ---
  c.target = ml_collections.ConfigDict()
  c.target.hf_dir = ""  # HF directory, a .gguf file or "smollm2"; "" = pretrain a tiny target here
  c.target.preset = ""  # named architecture (ppow_jax/models/presets.py) for the memory plan
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
  c.target.sample_tokens = 48  # greedy sample length shown in the report (0 = none)
  c.target.optim = optim(6e-3, 30, 500)

  # --- Drafter ---
  c.drafter = ml_collections.ConfigDict()
  c.drafter.kind = "eagle3"  # "eagle3" (target features) | "lm" (independent small LM)
  c.drafter.init_from = ""  # EAGLE-3 or HF LM directory to start from ("" = random init)
  c.drafter.preset = ""  # kind="lm": a named architecture ("" = derived from the target)
  c.drafter.draft_vocab_size = 0  # eagle3: reduced draft vocab (0 = the target's)
  c.drafter.hidden_size = 0  # 0 = the target's hidden size (eagle3) / half of it (lm)
  c.drafter.intermediate_size = 0  # 0 = the target's (eagle3) / half of it (lm)
  c.drafter.num_layers = 1  # kind="lm" without a preset: depth
  c.drafter.dtype = "float32"  # compute dtype
  c.drafter.param_dtype = "float32"  # master weights
  c.drafter.norm_before_fc = True  # eagle3: RMSNorm the fused target features before fc
  c.drafter.head_from_target = False  # eagle3: lm_head/norm start as the target's (kept rows)
  # eagle3: the target hidden states fused, as indices of the layers whose inputs are read
  # (num_layers = the last layer's output); () = EAGLE-3's inputs of layers {2, L//2, L-3}
  c.drafter.aux_layers = ()
  # eagle3: start as the identity on the third fused feature with the target's head and final
  # norm (Medusa's initialisation): with aux_layers ending at the target's num_layers, the
  # untrained drafter proposes what the target predicted one position earlier
  c.drafter.residual_start = False

  # --- Token-level baseline (EAGLE-3 training-time test) ---
  c.baseline = ml_collections.ConfigDict()
  c.baseline.steps = 150  # optimizer steps
  c.baseline.batch_size = 8  # sequences per step
  c.baseline.divergence = "forward_kl"  # forward_kl | reverse_kl | jsd | tv | neg_log_alpha
  c.baseline.ttt_steps = 3  # unrolled steps S (EAGLE-3 uses 7; 3 keeps the CPU demo short)
  c.baseline.step_decay = 0.8  # weight of step i is decay**i
  c.baseline.ttt_from_step = 0  # before this step S = 1: the first draft step learns alone
  c.baseline.feature_regression = 0.0  # EAGLE-1's smooth-L1 on the drafter's normed output (weight)
  c.baseline.feature_noise = 0.0  # EAGLE-1's U(-a, a) noise on the features, in units of their RMS
  c.baseline.document_mask = False  # attention within each conversation of a packed row
  c.baseline.feature_cache = True  # eagle3: target features computed once, reused every epoch
  c.baseline.feature_rows = 0  # rows with cached features (0 = steps * batch, at most an epoch)
  c.baseline.feature_dtype = "float16"  # storage dtype of cached features
  # target context of cached features: 0 = each packed row alone (what a live step sees);
  # N = each document alone from its start, up to N tokens (what inference sees)
  c.baseline.feature_context = 2048
  c.baseline.support_only = False  # renormalise the target on the draft vocab (EAGLE-3's loss)
  c.baseline.optim = optim(3e-3, 20, 150)

  # --- PPOW (starts from the baseline drafter) ---
  c.ppow = ml_collections.ConfigDict()
  c.ppow.steps = 60  # optimizer steps (each: one rollout, ppo_epochs updates)
  c.ppow.seed = 0  # added to the PPOW and control stages' seed (rng, data order): study seeds
  c.ppow.batch_size = 4  # sequences per step
  c.ppow.window = 6  # K: tokens per sampled window
  c.ppow.group_size = 8  # G: windows per start (advantages standardised within)
  c.ppow.starts_per_seq = 4  # ADAW: window starts chosen per sequence
  c.ppow.gamma = 0.1  # drafter/target cost ratio for the speed reward; -1 = measure here
  c.ppow.speed_form = "paper"  # speed reward: "paper" a/(aγ+1) | "committed_per_cost" (a+1)/(1+γK)
  c.ppow.use_speed = True  # ablation: Cost-Aware Speedup Reward on/off
  c.ppow.use_prox = True  # ablation: Distribution-Based Proximity Reward on/off
  c.ppow.prox_form = "indicator"  # "indicator": η·1[Δ<ε] if a=0 (paper) | "expected_length"
  c.ppow.lambda_prox = 1.0  # weight of the proximity reward
  c.ppow.prox_eta = 1.0  # indicator form: reward value η
  c.ppow.prox_eps = 1.0  # indicator form: threshold ε on the target log-prob gap Δ (nats)
  c.ppow.selection = "topk"  # ADAW selection across the pool: topk | softmax | uniform (ablation)
  c.ppow.selection_temperature = 1.0  # softmax selection temperature τ_w
  c.ppow.pool_size = 16  # ADAW pool: sequences kept across steps (multiple of batch_size; 0 = batch)
  c.ppow.pool_refresh_every = 10  # steps between re-scoring the whole pool with the drafter
  c.ppow.adaw_warmup_steps = 0  # uniform window selection for the first steps, then ADAW
  c.ppow.adaw_scoring = "self_fed"  # ADAW's q: "self_fed" (K-step unroll) | "teacher_forced"
  c.ppow.clip_eps = 0.2  # PPO clip ε
  c.ppow.ratio = "token"  # PPO ratio: token | geometric_mean (GTO)
  c.ppow.omega = 0.5  # weight of the anchor: D(p‖q) to the target at the trained window positions
  c.ppow.anchor_divergence = "forward_kl"  # divergence D of that anchor
  c.ppow.anchor_ttt_weight = 0.0  # > 0: adds this × the baseline's TTT loss on the batch
  c.ppow.ppo_epochs = 2  # updates per rollout
  c.ppow.adv_delta = 1e-6  # δ in the group standardisation
  c.ppow.adv_min_std = 1e-3  # groups whose reward std is below this get zero advantage
  c.ppow.optim = optim(3e-4, 10, 60)

  # --- Continued-baseline control ---
  c.continued = ml_collections.ConfigDict()
  c.continued.enabled = True  # the baseline on PPOW's batches, in order, with PPOW's update count
  c.continued.optim = optim(3e-4, 10, 60)  # schedule shape must equal ppow.optim's

  # --- Evaluation (docs/protocol.md's unified protocol) ---
  c.eval = ml_collections.ConfigDict()
  c.eval.benchmarks = ""  # comma-separated sets: humaneval,chat (each reported, and their mean)
  c.eval.prompts_file = ""  # JSONL (prompt / conversations / messages); "" = held-out split
  c.eval.num_prompts = 16  # prompts evaluated (per benchmark)
  c.eval.prompt_len = 48  # held-out prompts: tokens of context; files: max (longer truncate)
  c.eval.prompt_policy = "truncate_left"  # longer prompts: "truncate_left" (warn) | "reject"
  c.eval.max_new_tokens = 64  # new tokens per prompt
  c.eval.temperatures = (0.0, 1.0)  # decoding temperatures
  c.eval.window = -1  # K at evaluation; -1 = ppow.window (train and evaluate one K)
  c.eval.tree = ()  # also EAGLE-2 trees: (total_tokens, depth, top_k); () or (0, 0, 0) = chain only
  c.eval.batch_sizes = (1, 8)  # 1 = the speedup protocol; >1 = batched throughput
  c.eval.repeats = 3  # timed runs; speedups use the median (0: τ and α̂ only, not timed)
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

  # --- Checkpoints and logging ---
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.save_every = 50  # steps between checkpoints
  c.checkpoint.max_to_keep = 2  # latest checkpoints kept
  c.checkpoint.eval_every = 50  # steps between held-out greedy τ checks (eval_tau); 0 = off
  c.checkpoint.eval_prompts = 8  # held-out prompts in that check
  c.log_every = 10  # steps between console/TensorBoard lines
  return c


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
  """``"smoke,lm"`` or ``"tensor=8,runlocal"`` -> options named in ``spec`` (their defaults).

  A bare name sets a boolean option; ``name=value`` is cast to the default's type. An unknown
  name is a ValueError listing the known ones.
  """
  out = ml_collections.ConfigDict(spec)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    name, eq, value = item.partition("=")
    if name not in spec:
      raise ValueError(f"unknown config variant {name!r}; expected some of {sorted(spec)}")
    default = spec[name]
    if not eq:
      if not isinstance(default, bool):
        raise ValueError(f"config variant {name!r} needs a value: {name}=...")
      out[name] = True
    elif isinstance(default, bool):
      out[name] = value.lower() in ("1", "true", "yes")
    else:
      out[name] = type(default)(value)
  return out


def real_run(preset: str, arg: str | None, tensor: int) -> ml_collections.ConfigDict:
  """Shared recipe of the real-target configs (EAGLE-3 drafter, ShareGPT-style data).

  ``arg``: ``tpu_v5p`` (default) | ``gpu_8xh100`` | ``runlocal`` (the tiny preset, a smoke
  run). ``tensor``: tensor-parallel width of the frozen target (must divide its KV heads).
  """
  v = parse_arg(arg, tpu_v5p=False, gpu_8xh100=False, runlocal=False)
  if v.tpu_v5p + v.gpu_8xh100 + v.runlocal > 1:
    raise ValueError(f"config variants tpu_v5p, gpu_8xh100 and runlocal exclude each other; "
                     f"got {arg!r}")
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
  c.baseline.optim = optim(1e-4, 500, 20000)
  c.ppow.steps, c.ppow.batch_size = 4000, 16
  c.ppow.window = 10  # K
  c.ppow.pool_size = 64  # ADAW pool: four batches
  c.ppow.gamma = -1  # measure on the hardware at hand
  c.ppow.optim = optim(5e-6, 100, 4000)  # GTO's learning rate
  c.continued.optim = optim(5e-6, 100, 4000)
  c.eval.max_new_tokens, c.eval.batch_sizes = 512, (1, 8)  # eval.window: ppow.window
  c.eval.tree = (60, 7, 10)  # EAGLE-2's published tree, beside the chain
  c.eval.num_prompts = 80  # e.g. MT-Bench / HumanEval / GSM8K question files
  c.eval.prompt_len = 1024
  c.sharding.drafter_params = "fsdp"
  c.mesh.ici_shape = (-1, 1, tensor)
  c.checkpoint.save_every = 500
  c.log_every = 20
  if v.gpu_8xh100:
    c.mesh.ici_shape = (8 // tensor, 1, tensor)  # per node, over NVLink
    c.mesh.dcn_shape = (-1, 1, 1)  # nodes: data-parallel
  elif v.runlocal:
    c.target.preset = "tiny"
    c.target.dtype = c.target.param_dtype = "float32"
    c.drafter.dtype = "float32"
    c.drafter.draft_vocab_size = 128
    c.mesh.ici_shape = (-1, 1, 1)
    c.data.seq_len = 64
    c.baseline.batch_size = c.ppow.batch_size = 8
    c.ppow.group_size = c.ppow.window = 4
    c.eval.window, c.eval.max_new_tokens = 4, 16
  return c
