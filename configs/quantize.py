"""The main job: `qdlm quantize --config configs/quantize.py [--config.method=gptq ...]`."""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = "assets/tiny-llada"  # HF checkpoint dir, hub id or qdlm checkpoint
    # One run directory per resolved config: <model>-<method>-w<bits>g<group>-<calib>-<hash>,
    # holding config.json, results.json, report.md and the packed model/.
    c.out_dir = "runs/quantize"  # parent of the run directories
    c.overwrite = False  # a finished run of the same config is reused unless this is true
    c.method = "gptq"  # rtn | gptq | awq | daq | smoothquant | quarot | duquant
    c.bits = 4  # 2 | 3 | 4 | 8 (daq: the mean number of binary planes, 2 | 3 | 4)
    # Mixed precision (rtn | gptq | awq): the mean width of the blocks' linear weights
    # (parameter-weighted), spread over the blocks by sensitivity: each block alone is RTN-
    # quantized at each of mixed.widths and the KL of the model's output to fp measured on
    # mixed.samples calibration windows; an exact allocator picks the widths. The plan is
    # saved as plan.json in the run dir and in the checkpoint (docs/quantization.md).
    c.bits_budget = None  # e.g. 3.0 | 3.5; None: every block at `bits`
    c.mixed = ml_collections.ConfigDict(dict(
        widths=(2, 3, 4, 8),  # candidate widths of a block
        samples=8))  # calibration windows the sensitivity KL is measured on
    c.group_size = 128  # 32 | 64 | 128 | -1 (per output channel)
    c.sym = False  # symmetric weight grid (no zero point)
    c.clip_ratio = 1.0  # weight range shrink factor before rounding (1.0: min / max)
    # Activation bits of every linear input: 16 = float (weight-only PTQ); 8 or 4 with
    # smoothquant | quarot | duquant, or with rtn / gptq as the untransformed baseline.
    c.act_bits = 16  # 16 (float) | 8 | 4
    c.act = ml_collections.ConfigDict(dict(
        granularity="per_token",  # per_token | per_group | per_tensor activation scales
        group_size=128,  # per_group: consecutive input channels per scale (32 | 64 | 128)
        sym=True,  # symmetric activation grid
        clip_ratio=1.0))  # activation range shrink factor before rounding
    # K/V quantization inside attention (keys after RoPE; quarot rotates q/k by a Hadamard
    # first), for every weight-activation method: bits 16 = float | 8 | 4; granularity
    # per_head (per token and head) | per_channel_group (per token, head and group_size
    # channels of the head) | per_token_group (per channel over group_size tokens).
    c.act.kv = ml_collections.ConfigDict(dict(
        bits=16,  # K/V bits: 16 = float | 8 | 4
        granularity="per_head",  # per_head | per_channel_group | per_token_group
        sym=False,  # symmetric K/V grid
        group_size=64))  # per_token_group: tokens; per_channel_group: channels of a head
    # DLLMQuant's IA-AQ: per kv head, the clip ratio of V (and of K with search_keys) on a grid
    # of `grid` points from 1.0 down to `lowest`, minimising the attention-output error
    # weighted by each token's attention importance, on the calibration data.
    c.act.iaaq = ml_collections.ConfigDict(dict(
        enabled=False,  # search V's clip ratios (needs act.kv.bits < 16)
        search_keys=False,  # search K's clip ratios too
        grid=10,  # clip ratios tried per head
        lowest=0.55))  # smallest clip ratio tried
    c.wa = ml_collections.ConfigDict(dict(
        alpha=0.5,  # smoothing migration strength (smoothquant, duquant)
        weight_quantizer="rtn",  # rtn | gptq: how smoothquant/quarot/duquant round weights
        block=128, rotation_steps=256,  # duquant
        online_heads=True,  # quarot: Hadamard across heads before o_proj
        quantize_lm_head=False,  # quantize the LM head's weights and input too
        seed=0))  # quarot's random signs, duquant's rotations
    # MoE models (DiffusionGemma): routers stay exact unless quantize_router; every
    # expert tensor is packed per expert; the report ends with the coverage table.
    c.moe = ml_collections.ConfigDict(dict(
        quantize_router=False,  # quantize the router projections with the weight method too
        router_bits=0,  # a quantized router's width (0: --config.bits)
        parts=("experts", "attention", "dense_mlp", "self_conditioning"),  # quantized; rest kept
        calib_modes="both",  # gptq, awq: encoder (clean prompts) | decoder (noised canvases) | both
        levels=(0.25, 0.5, 0.75, 1.0),  # gptq, awq: the decoder calibration's noise levels
        self_condition=True,  # gptq, awq: the decoder calibration pass is self-conditioned
        thin_min_rows=16,  # gptq: an expert routed fewer rows is thin
        thin_fallback="damp",  # gptq, thin experts: damp (more dampening) | all_tokens
        thin_damp=0.1))  # gptq: the damp fallback's dampening
    c.calibration = "clean"  # clean | masked | trajectory
    c.calib = ml_collections.ConfigDict(dict(
        source="bigbench-wikipedia",  # a data.sources name or a local text / JSONL file
        n_samples=32,  # calibration windows
        seq_len=128,  # tokens per window (also the held-out windows' length)
        prefix_frac=0.0,  # visible prefix (masked) / prompt length (trajectory), of seq_len
        certainty_weights=False,  # DLLMQuant's CGQ: weight tokens by the model's certainty
        unmasked_weight=0.7,  # CGQ: weight of visible tokens
        trajectory_steps=16,  # trajectory: denoising steps recorded per window
        seed=0))  # masking and sampling seed
    c.gptq = ml_collections.ConfigDict(dict(
        damp=0.01,  # dampening, a fraction of the mean Hessian diagonal
        block_size=128,  # columns per lazy-update block
        act_order=False,  # quantize columns by decreasing Hessian diagonal
        static_groups=False))  # act_order: group scales fixed before the column loop
    c.awq = ml_collections.ConfigDict(dict(
        grid=20,  # scale exponents searched in [0, 1)
        clip=True))  # search a clip ratio per output channel after scaling
    # Quant-dLLM's DAQ + ABMP (docs/quantization.md): group_size is the ABMP/scale block;
    # abmp_ratio: fraction of blocks given one plane more (and as many one plane fewer;
    # published: 0.05 LLaDA, 0.10 Dream); salient: DOR weight of salient weights;
    # compensate: none | block | column (GPTQ's column loop with the DAQ codebook); refit:
    # scale refits to the values the column loop met; abmp_check: keep a matrix's ABMP
    # allocation only if it lowers its output error against uniform planes.
    c.daq = ml_collections.ConfigDict(dict(
        abmp_ratio=0.1,  # fraction of blocks given one plane more (as many one fewer)
        iters=15,  # row-column rescaling rounds
        salient=2.0,  # DOR weight of salient weights
        data_weight=True,  # weight the objective by the Hessian diagonal
        compensate="column",  # none | block | column
        refit=1,  # column: scale refits to the values the loop met
        abmp_check=True))  # keep ABMP only where it lowers the output error
    # Scored on the fp and the quantized model: the held-out bound (n_windows x 128 tokens,
    # mc_num samples), 2-digit addition (arith_n problems), and `tasks`: built-in task names,
    # comma-separated (e.g. arithmetic_subtract,synthetic_code,synthetic_compare), each on
    # task_limit held-out items.
    c.eval = ml_collections.ConfigDict(dict(
        n_windows=16,  # held-out windows of the bound and KL
        mc_num=32,  # Monte Carlo samples per window
        arith_n=100,  # held-out 2-digit addition problems
        skip_fp=False,  # skip the fp model's evaluation (no KL to fp)
        tasks="",  # built-in task names, comma-separated
        task_limit=100))  # items per task
    c.save = True  # write the packed checkpoint (loadable by `qdlm generate`)
    # auto | true | false: weight-only PTQ of a hub checkpoint block by block from its memory
    # maps (memory bounded by one block, resumable after a kill); auto streams checkpoints
    # over 2 GiB. Streaming never holds the fp model: fp figures and KL to fp are skipped.
    c.stream = "auto"  # auto | true | false
    return c
