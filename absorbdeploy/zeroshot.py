"""Optional zero-shot accuracy of the dense and the pruned model through lm-eval's in-memory `HFLM` (torch backend).

absorbdeploy never downloads: lm-eval's task data must already be in the local HF datasets cache. When lm-eval is not
installed, the tasks are not available offline or `validate.zero_shot.enabled` is false, the report says so and why.
Every number names the backend that produced it (lm-eval's HF and vLLM backends are known to disagree).
"""


def evaluate(model, tokenizer, settings) -> dict:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        return {"status": "skipped", "reason": "lm_eval is not installed (pip install 'absorbdeploy[eval]')"}
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(settings.tasks), num_fewshot=0, limit=settings.limit)
    except Exception as e:  # task data missing offline is the common case; the run goes on without accuracy
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return {"status": "skipped", "reason": f"lm-eval could not run the tasks offline ({e.__class__.__name__}: {first[:160]})"}
    accuracies = {task: metrics.get("acc,none") for task, metrics in out["results"].items()}
    values = [a for a in accuracies.values() if a is not None]
    return {"status": "ok", "backend": "lm-eval HFLM (torch, in memory), 0-shot", "accuracy": accuracies,
            "mean": sum(values) / len(values) if values else None, "limit": settings.limit}


def compare(dense_model, pruned_model, tokenizer, settings) -> dict:
    if not settings.enabled:
        return {"status": "off", "reason": "validate.zero_shot.enabled is false"}
    dense = evaluate(dense_model, tokenizer, settings)
    if dense["status"] != "ok":
        return dense
    return {"status": "ok", "dense": dense, "pruned": evaluate(pruned_model, tokenizer, settings)}
