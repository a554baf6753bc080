"""`qdlm-lm-eval`: lm-evaluation-harness's own command line with the `qdlm-jax` model
registered (`python -m qdlm_jax.evals.lm_eval_cli` is the same). Every lm-eval flag works as
typed; see `qdlm_jax.evals.lm_eval_adapter` for the model arguments."""

from __future__ import annotations


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        raise SystemExit(f"qdlm-lm-eval needs lm-eval ({e}); install the `eval` extra: "
                         "pip install -e '.[eval]'") from None
    import qdlm_jax.evals.lm_eval_adapter  # noqa: F401  (registers the `qdlm-jax` model)

    cli_evaluate()


if __name__ == "__main__":
    main()
