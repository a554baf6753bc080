"""The main job: `qdlm quantize --config configs/quantize.py [--config.method=gptq ...]`."""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = "assets/tiny-llada"  # HF checkpoint dir or qdlm checkpoint
    # One run directory per resolved config: <model>-<method>-w<bits>g<group>-<calib>-<hash>,
    # holding config.json, results.json, report.md and the packed model/.
    c.out_dir = "runs/quantize"
    c.overwrite = False  # a finished run of the same config is reused unless this is true
    c.method = "gptq"  # rtn | gptq | awq | daq | smoothquant | quarot | duquant
    c.bits = 4  # 2 | 3 | 4 | 8 (daq: the mean number of binary planes, 2 | 3 | 4)
    c.group_size = 128  # 32 | 64 | 128 | -1 (per output channel)
    c.sym = False
    c.clip_ratio = 1.0
    # Activation bits of every linear input: 16 = float (weight-only PTQ); 8 or 4 with
    # smoothquant | quarot | duquant, or with rtn / gptq as the untransformed baseline.
    c.act_bits = 16
    c.act = ml_collections.ConfigDict(dict(granularity="per_token", sym=True, clip_ratio=1.0))
    # K/V quantization inside attention (keys after RoPE; quarot rotates q/k by a Hadamard
    # first), for every weight-activation method: bits 16 = float | 8 | 4; granularity
    # per_head (per token and head) | per_token_group (per channel over group_size tokens).
    c.act.kv = ml_collections.ConfigDict(dict(bits=16, granularity="per_head", sym=False,
                                              group_size=64))
    # DLLMQuant's IA-AQ: per kv head, the clip ratio of V (and of K with search_keys) on a grid
    # of `grid` points from 1.0 down to `lowest`, minimising the attention-output error
    # weighted by each token's attention importance, on the calibration data.
    c.act.iaaq = ml_collections.ConfigDict(dict(enabled=False, search_keys=False, grid=10,
                                                lowest=0.55))
    c.wa = ml_collections.ConfigDict(dict(
        alpha=0.5,  # smoothing migration strength (smoothquant, duquant)
        weight_quantizer="rtn",  # rtn | gptq: how smoothquant/quarot/duquant round weights
        block=128, rotation_steps=256,  # duquant
        online_heads=True,  # quarot: Hadamard across heads before o_proj
        quantize_lm_head=False, seed=0))
    c.calibration = "clean"  # clean | masked | trajectory
    c.calib = ml_collections.ConfigDict(dict(
        source="bigbench-wikipedia", n_samples=32, seq_len=128, prefix_frac=0.0,
        certainty_weights=False, unmasked_weight=0.7, trajectory_steps=16, seed=0))
    c.gptq = ml_collections.ConfigDict(dict(damp=0.01, block_size=128, act_order=False,
                                            static_groups=False))
    c.awq = ml_collections.ConfigDict(dict(grid=20, clip=True))
    # Quant-dLLM's DAQ + ABMP (docs/quantization.md): group_size is the ABMP/scale block;
    # abmp_ratio: fraction of blocks given one plane more (and as many one plane fewer;
    # published: 0.05 LLaDA, 0.10 Dream); salient: DOR weight of salient weights;
    # compensate: none | block | column (GPTQ's column loop with the DAQ codebook); refit:
    # scale refits to the values the column loop met; abmp_check: keep a matrix's ABMP
    # allocation only if it lowers its output error against uniform planes.
    c.daq = ml_collections.ConfigDict(dict(abmp_ratio=0.1, iters=15, salient=2.0,
                                           data_weight=True, compensate="column", refit=1,
                                           abmp_check=True))
    # Scored on the fp and the quantized model: the held-out bound (n_windows x 128 tokens,
    # mc_num samples), 2-digit addition (arith_n problems), and `tasks`: built-in task names,
    # comma-separated (e.g. arithmetic_subtract,synthetic_code,synthetic_compare), each on
    # task_limit held-out items.
    c.eval = ml_collections.ConfigDict(dict(n_windows=16, mc_num=32, arith_n=100,
                                            skip_fp=False, tasks="", task_limit=100))
    c.save = True  # write the packed checkpoint (loadable by `qdlm generate`)
    # auto | true | false: weight-only PTQ of a hub checkpoint block by block from its memory
    # maps (memory bounded by one block, resumable after a kill); auto streams checkpoints
    # over 2 GiB. Streaming never holds the fp model: fp figures and KL to fp are skipped.
    c.stream = "auto"
    return c
