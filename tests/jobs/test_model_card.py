"""The model card's phase table for a run started from a saved model's weights."""

from qdlm_jax.jobs.model_card import phase_lines


def _phase(a, b, before, time_s):
    return {"steps": [a, b], "before_start": before, "text_rows": 16, "task_rows": 128,
            "mix": {"add2": 2.0}, "task_seq_len": 33, "text_tokens": (b - a) * 16 * 128,
            "task_rows_seen": (b - a) * 128, "train_time_s": time_s,
            "final_loss": None if before else 1.0, "final_text_loss": None if before else 5.0,
            "final_sft_loss": None if before else 0.1}


def test_phases_before_the_start_step_point_to_the_earlier_run():
    s = {"phases": [_phase(0, 100, True, 0.0), _phase(100, 300, False, 600.0)]}
    c = {"data": {"seq_len": 128, "task_seq_len": 33}}
    rows = [line for line in phase_lines(s, c) if line.startswith("| 0") or
            line.startswith("| 100")]
    assert len(rows) == 2
    assert "earlier run" in rows[0] and "– / –" in rows[0]
    assert "10.0 min" in rows[1] and "5.000 / 0.100" in rows[1]


def test_the_objective_column_follows_the_phase_keys_and_the_family():
    s = {"family": "llada", "phases": [_phase(0, 100, False, 60.0)] * 3}
    c = {"data": {"seq_len": 128, "task_seq_len": 33,
                  "phases": [{}, {"text_shift": True}, {"shift": True}]}}
    rows = [line for line in phase_lines(s, c) if line.startswith("| 0")]
    assert ["| unshifted / unshifted |" in rows[0], "| shifted / unshifted |" in rows[1],
            "| shifted / shifted |" in rows[2]] == [True] * 3
    dream = phase_lines({**s, "family": "dream"}, c)
    assert [line for line in dream if line.startswith("| 0")][0].count("| shifted / shifted |")
