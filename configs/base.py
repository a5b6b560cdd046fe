"""Base configuration of every dil_jax run; derived files override fields, never copy them.

Launch (any derived file works the same way):

  python -m dil_jax.main --config=configs/base.py --workdir=/tmp/dil_base \
      --config.loss.name=dil_lsif --config.train.steps=200

Fields are grouped as model, data, loss, reference, lora, optim, mesh, checkpoint, train,
eval, online, init.
A field left at ``None`` means "the component's documented default" (e.g. a loss's own β).
"""

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.seed = 0  # parameter init and per-step randomness (fold_in(rng, step))

    # ---- model: the policy (and the reference, which shares its architecture) ----
    config.model = ConfigDict()
    config.model.family = "llama"  # a file in dil_jax/models/
    config.model.vocab_size = 32
    config.model.hidden_size = 64
    config.model.intermediate_size = 256
    config.model.num_hidden_layers = 2
    config.model.num_attention_heads = 4
    config.model.num_key_value_heads = 2  # grouped-query attention
    config.model.max_position_embeddings = 64
    config.model.rope_theta = 10000.0
    config.model.rms_norm_eps = 1e-6
    config.model.tie_word_embeddings = False
    config.model.dtype = "float32"  # compute dtype; 'bfloat16' for bf16 compute ...
    config.model.param_dtype = "float32"  # ... with float32 master weights
    config.model.remat = False  # recompute each layer in the backward pass (memory for FLOPs)
    config.model.scan_layers = True  # one compiled layer body: fast compiles for deep models
    # Attention kernel (dil_jax/models/attention.py): 'auto' (cuDNN flash attention on a GPU
    # in bf16/fp16, Pallas splash attention on TPU, else the einsum), 'xla' (float32 einsum,
    # the reference), 'dot_product' (jax.nn.dot_product_attention's XLA path), 'cudnn',
    # 'chunked' (the einsum over query blocks recomputed in the backward: memory), 'splash'
    # (interpret mode off TPU; prefix-shared rows fall back to 'chunked'). Gemma 2: no cudnn.
    config.model.attention = "auto"
    # A Hugging Face model directory or hub id: its config.json defines the architecture (the
    # fields above are then ignored) and init.mode='hf' loads its weights.
    config.model.hf_path = placeholder(str)

    # ---- data: the gold task, or real data from files / the hub (dil_jax/data/) ----
    config.data = ConfigDict()
    # 'gold_task' (built-in synthetic task, dil_jax/data/gold_task.py), 'files' (local
    # .jsonl/.json/.parquet, optionally .gz) or 'hub' (datasets.load_dataset).
    config.data.source = "gold_task"
    # 'preference' (N=2 chosen/rejected) or 'sft' (N=1); real data: the format is detected within
    # that kind, or 'auto', or named: prompt_chosen_rejected, chat_pairs, hh_transcripts,
    # comparison, demonstration_pairs, prompt_response, chat_messages, and (named only)
    # prompt_completion_label (KTO's labelled completions), ranked_responses (N >= 2 scored
    # responses, listwise losses) (dil_jax/data/formats.py).
    config.data.format = "preference"
    config.data.response_source = "base"  # gold task: which distribution the responses come from
    config.data.num_train = 4096  # gold task: examples generated
    # gold task: held-out examples generated; real data without an eval source: examples held
    # out of the training set (0: no evaluation data).
    config.data.num_eval = 256
    config.data.seed = 1234  # data generation / shuffling / hold-out seed (not config.seed)
    # real data sources
    config.data.train_files = ()  # local files, read in order
    config.data.eval_files = ()  # () -> hold out num_eval training examples
    config.data.rejected_files = ()  # 'demonstration_pairs': the weaker model's demonstrations
    config.data.hub_id = ""  # source 'hub': a hub dataset id (or a local dataset directory)
    config.data.hub_config = ""
    config.data.hub_revision = ""  # pin it: the tokenisation cache is keyed on it
    config.data.hub_data_dir = ""  # a sub-folder of the dataset (hh-rlhf: helpful-base)
    config.data.train_split = "train"
    config.data.eval_split = ""  # '' -> hold out num_eval training examples
    config.data.max_records = 0  # read at most this many records per split (0: all)
    # canonical field -> dotted path in the records ('' = the format's default names)
    # ('label': KTO's desirable flag, 'scores': the ranks of ranked_responses)
    config.data.field_map = ConfigDict(
        {
            k: ""
            for k in (
                "prompt",
                "chosen",
                "rejected",
                "response",
                "messages",
                "responses",
                "response_text",
                "choice",
                "label",
                "scores",
            )
        }
    )
    # tokenisation (dil_jax/data/tokenize.py)
    config.data.tokenizer = ""  # local dir, tokenizer.json path or hub id
    config.data.eos_token = ""  # overrides/supplies the EOS token ('<|endoftext|>' for GPT-2)
    config.data.chat_template = "auto"  # 'auto' | 'chat' (tokenizer's template) | 'plain'
    config.data.prompt_template = "{prompt}"  # plain rendering of a string prompt
    config.data.response_template = "{response}"  # plain rendering, directly after the prompt
    config.data.max_length = 512  # tokens of prompt + response
    config.data.max_prompt_length = 256  # longer prompts are cut per truncation_mode
    config.data.truncation_mode = "keep_end"  # prompt cut: 'keep_end' (DIL/TRL) | 'keep_start'
    config.data.too_long = "truncate"  # 'truncate' (counted) | 'drop' records that need a cut
    config.data.boundary_mismatch = "repair"  # prompt tokens not a prefix: 'repair' | 'reject'
    config.data.on_bad_record = "error"  # 'error' (stop, naming file:line field) | 'skip'
    # batching: padded lengths (each batch uses the smallest that fits; max_length is always
    # the last), so the step compiles at most len(buckets) times; or pack examples into rows of
    # max_length tokens with segment_ids/positions; every loss but KTO's reads per-example sums
    # from segment reductions in the step, and train.global_batch_size then counts rows.
    config.data.buckets = (128, 256, 512)
    config.data.packing = False
    # Prefix sharing: an example's N sequences as one [prompt | response_1 | ... | response_N]
    # row, each response attending to the prompt and itself only (positions restart at the
    # prompt's end), so a prompt is computed once per example. Rows of N * max_length tokens
    # (bucketed as before, or packed with data.packing).
    config.data.prefix_sharing = False
    config.data.cache_dir = ""  # tokenised-data cache; '' -> <workdir>/../data_cache
    config.data.num_proc = 1  # tokenisation processes (datasets.map)

    # ---- loss: a primary objective plus optional extra weighted terms ----
    config.loss = ConfigDict()
    config.loss.name = "dil_lsif"  # see dil_jax.objectives.LOSSES
    config.loss.weight = 1.0
    # Hyper-parameters (dil_jax.objectives.PARAMS): None = the chosen loss's own default; setting
    # one the chosen loss does not use is an error naming the field.
    config.loss.beta = placeholder(float)  # DPO-family temperature; DIL: optional temperature on Δ
    config.loss.reduction = placeholder(str)  # 'sum' (papers' equations) or 'mean' (DIL code)
    config.loss.label_smoothing = placeholder(float)  # cdpo / robust / exo_pair / aot ε
    config.loss.gamma = placeholder(float)  # simpo margin
    config.loss.lam = placeholder(float)  # cpo / orpo NLL weight
    config.loss.alpha = placeholder(float)  # dil_basu power, fdpo α-divergence
    config.loss.divergence = placeholder(str)  # fdpo: reverse_kl | forward_kl | js | alpha
    config.loss.max_log_ratio = placeholder(float)  # overflow guard: exp(βΔ) exact up to this
    config.loss.tau = placeholder(float)  # discopop modulation temperature
    config.loss.desirable_weight = placeholder(float)  # kto λ_D
    config.loss.undesirable_weight = placeholder(float)  # kto λ_U
    config.loss.sft_weight = 0.0  # > 0 adds sft (NLL on chosen) with this weight
    config.loss.extra_terms = ()  # more terms: ({'name': 'ipo', 'weight': 0.5, 'beta': 0.1},)

    # ---- reference model ----
    config.reference = ConfigDict()
    # 'inline': frozen reference params evaluated inside the step (stop-gradient, never donated);
    # 'precomputed': one sharded pass over the data before training, cached on disk.
    config.reference.mode = "inline"
    config.reference.cache_dir = ""  # '' -> <workdir>/../reference_cache
    config.reference.batch_size = 64  # global batch of the precompute pass

    # ---- LoRA / QLoRA adapters (dil_jax/lora.py; read by lora.settings_from_config) ----
    # enabled: train low-rank adapters on a frozen base (the start of the run, per config.init);
    # only the adapters are in the optimiser state and the checkpoints, and the reference is
    # the base with the adapters off (no second copy of the weights).
    config.lora = ConfigDict()
    config.lora.enabled = False
    config.lora.rank = 8  # r: at most the smaller side of every targeted kernel
    config.lora.alpha = 16.0  # the update is (alpha / rank) * x A B
    config.lora.dropout = 0.0  # on the adapter's input only, during training steps
    # Regexes searched in the '/'-joined kernel paths, as in the partition rules; each must
    # match at least one dense kernel. Default: attention and MLP projections of every family.
    config.lora.targets = (r"att.*/kernel$", r"mlp/.*kernel$")
    # The base's layer kernels stored quantised (QLoRA): 'none', 'int8' or 'nf4' (4-bit
    # NormalFloat, two codes a byte), with one float32 absmax per quant_block_size input rows.
    config.lora.quantize = "none"
    config.lora.quant_block_size = 64

    # ---- log-prob computation ----
    config.logprobs = ConfigDict()
    config.logprobs.seq_chunk = 0  # > 0: chunk the LM head over the sequence (no [B,N,T,V] logits)
    config.logprobs.vocab_chunk = 0  # > 0: online log-sum-exp over vocabulary chunks
    # With a chunk size: the head runs at scored (response) positions only, gathered into the
    # smallest of this many static sizes that fits (0: at every position). dil_jax/logprobs.py
    config.logprobs.score_buckets = 8

    # ---- optimiser: AdamW, warmup + decay, clipping ----
    config.optim = ConfigDict()
    config.optim.learning_rate = 1e-3
    config.optim.schedule = "cosine"  # 'cosine' | 'linear' | 'constant' (after warmup)
    config.optim.warmup_ratio = 0.1  # fraction of train.steps
    config.optim.end_lr_factor = 0.0  # final lr = learning_rate * end_lr_factor
    config.optim.weight_decay = 0.0
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.grad_clip = 1.0  # global-norm clipping; 0 disables
    config.optim.grad_accum_steps = 1  # micro-batches per global batch

    # ---- device mesh (data, fsdp, tensor); one -1 takes the remaining devices ----
    config.mesh = ConfigDict()
    config.mesh.shape = (-1, 1, 1)
    config.mesh.coordinator_address = placeholder(str)  # multi-host: host:port of process 0
    config.mesh.num_processes = placeholder(int)
    config.mesh.process_id = placeholder(int)

    # ---- checkpoints (orbax) ----
    config.checkpoint = ConfigDict()
    config.checkpoint.every_steps = 100
    config.checkpoint.keep = 3  # keep the last N
    config.checkpoint.async_save = True

    # ---- training loop ----
    config.train = ConfigDict()
    config.train.steps = 200
    config.train.global_batch_size = 64
    config.train.log_every = 1  # metrics.jsonl every step; raise to cut host syncs on big runs
    config.train.progress_bar = True
    config.train.tensorboard = True
    # Weights & Biases beside metrics.jsonl and TensorBoard (pip install 'dil_jax[wandb]'):
    # '' = off. Process 0 logs every logged step; the run id is kept in <workdir>/wandb_run_id,
    # so a resumed (e.g. preempted) run continues the same W&B run. entity '' = the account's
    # default; mode '' = wandb's default (or $WANDB_MODE), 'offline' writes under $WANDB_DIR
    # for a later `wandb sync`, 'disabled' turns it off without editing the project.
    config.train.wandb_project = ""
    config.train.wandb_entity = ""
    config.train.wandb_mode = ""
    # A finiteness flag is computed inside the step every step: 'halt' stops at the first
    # non-finite loss/gradient/parameter (never checkpointing it), 'skip' discards that update
    # (params and optimiser state unchanged, counted as `skipped`) and halts after
    # max_nonfinite consecutive skips.
    config.train.on_nonfinite = "halt"
    config.train.max_nonfinite = 10
    # Density-ratio diagnostics in metrics.jsonl (dil_jax/diagnostics.py; pair/list losses with a
    # reference): log r quantiles on chosen/rejected, DIL's implied E_ref[r], per-example gradient
    # weights, and on the host EMAs of logps/chosen and rewards/margins with the
    # likelihood-collapse alarm. Cheap (no extra forward pass); off by default.
    config.train.diagnostics = False

    # ---- evaluation ----
    config.eval = ConfigDict()
    config.eval.every_steps = 100  # held-out pairs: loss and reward metrics
    config.eval.batch_size = 64
    config.eval.num_batches = 4
    config.eval.gold_prompts = 256  # gold-task sampling evaluation at the end; 0 disables
    config.eval.temperature = 1.0  # 1.0 so the KL estimate is of the policy itself
    config.eval.top_p = 1.0
    config.eval.top_k = 0

    # ---- iterative / online alignment (dil_jax/online/iterative.py; read by online_spec) ----
    # Rounds of: sample k responses per prompt from the current policy, build pairs, train
    # steps_per_round steps of config.loss on them. Used by `python -m dil_jax.online.main`.
    config.online = ConfigDict()
    config.online.rounds = 3
    config.online.steps_per_round = 50  # optimiser steps per round (train.steps is ignored)
    config.online.num_prompts = 64  # prompts (with their demonstrations) sampled every round
    config.online.samples_per_prompt = 4  # k
    # 'ditto' (demonstration > samples, replay, later > earlier round), 'spin' (SFT response >
    # current sample) or 'ranked' (best > worst of the k samples by online.rank_by).
    config.online.pairs = "ditto"
    config.online.ditto_mix = (0.7, 0.2, 0.1)  # DITTO shares: online, replay, intermodel pairs
    config.online.num_pairs = 0  # pairs per round; 0 -> num_prompts * samples_per_prompt
    config.online.rank_by = "gold"  # 'gold' (gold task) | 'reward_model' (reward_model_dir)
    config.online.reward_model_dir = ""  # workdir of a trained reward model (dil_jax.afd)
    config.online.reward_model_level = "sequence"  # that reward model's level
    config.online.demo_source = "expert"  # gold task: the demonstrations' response source
    config.online.match_lengths = True  # cut demonstrations to sampling.max_new_tokens
    # Reference: 'fixed' (pi_0 throughout), 'hard' (the current policy at each round start,
    # SPIN / iterative DPO) or 'soft' (TR-DPO: ref <- a*policy + (1-a)*ref every tau steps).
    config.online.reference = "fixed"
    config.online.soft_alpha = 0.5  # a
    config.online.soft_every = 10  # tau, optimiser steps
    config.online.eval_prompts = 128  # held-out prompts evaluated after every round; 0: none
    config.online.sampling = ConfigDict()  # the round sampler (dil_jax/afd/rollouts.py)
    config.online.sampling.temperature = 1.0
    config.online.sampling.top_p = 1.0
    config.online.sampling.top_k = 0
    config.online.sampling.max_new_tokens = 12  # the gold task's response budget
    config.online.sampling.max_batch = 512  # most sequences in one sampler call
    config.online.sampling.eos_id = 2  # gold task EOS; real data: the tokenizer's EOS id
    config.online.sampling.pad_id = 0

    # ---- where the initial policy (and the reference) come from ----
    # Resume order: latest checkpoint in the workdir, else init.mode:
    # 'scratch' (random init by seed), 'checkpoint' (params of the latest checkpoint in
    # init.checkpoint_dir), 'hf' (Hugging Face weights from model.hf_path), 'pretrain' (first
    # run the run described by init.pretrain in <workdir>/base, then start from its params).
    config.init = ConfigDict()
    config.init.mode = "scratch"
    config.init.checkpoint_dir = ""
    config.init.pretrain = placeholder(ConfigDict)
    return config
