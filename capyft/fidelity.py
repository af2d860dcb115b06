"""How closely a merged model follows the model that was evaluated: mean KL, greedy next-token agreement and NLL
on a few held-out conversations, against the adapter's own effect. Plain functions over transformers models; used
by :mod:`capyft.export`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

FIDELITY_TOKENS = 256  # tokens per held-out conversation: enough positions for a stable mean, cheap for an 8B model


def held_out_conversations(
    data: dict[str, Any], fidelity_data: str | Path | None = None, rows: int = 4
) -> tuple[list[list[dict[str, str]]], str]:
    """Up to ``rows`` conversations to compare models on, and where they come from.

    ``fidelity_data`` when given; else the run's test rows (or validation rows) when its data source is a local
    path that still exists (``data``: the data module's settings); else the last rows of the bundled sample, which
    the demo holds out for testing.
    """
    from capyft.data import SAMPLE_DATA, load_source, split_source, to_messages

    if fidelity_data is not None:
        pool = load_source(fidelity_data)
        split = pool["train"] if "train" in pool else pool[next(iter(pool))]
        picked, description = split.select(range(min(rows, len(split)))), f"the first rows of {fidelity_data}"
    else:
        picked, description = None, ""
        source = data.get("source")
        if source and Path(str(source)).expanduser().exists():
            sizes = [data.get(k) for k in ("train_size", "val_size", "test_size")]
            try:
                shuffle, seed = bool(data.get("shuffle", False)), data.get("seed", 42)
                splits = split_source(load_source(source), sizes[0], sizes[1] or 0, sizes[2] or 0, shuffle, seed)
            except (ValueError, OSError) as err:
                log.info("cannot split %s as the run did (%s)", source, err)
                splits = {}
            for name in ("test", "val"):
                if len(splits.get(name, [])):
                    split = splits[name]
                    picked, description = split.select(range(min(rows, len(split)))), f"{name} rows of {source}"
                    break
        if picked is None:
            sample = load_source(SAMPLE_DATA)["train"]
            picked = sample.select(range(len(sample) - rows, len(sample)))
            description = f"the last {rows} bundled sample rows"
    conversations = [to_messages(row) for row in picked]
    if not conversations:
        raise ValueError(f"no conversation to measure the merge on in {fidelity_data}; give --fidelity_data FILE")
    return conversations, description


def encode(tokenizer: Any, messages: list[dict[str, str]], system_prompt: str | None) -> list[int]:
    from capyft.chat import encode_conversation

    return encode_conversation(messages, tokenizer, FIDELITY_TOKENS, system_prompt=system_prompt)["input_ids"]


@torch.inference_mode()
def logits(model: Any, inputs: list[list[int]]) -> list[torch.Tensor]:
    model.eval()
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in inputs]


def compare_logits(
    reference: list[torch.Tensor],
    candidate: list[torch.Tensor],
    without_adapter: list[torch.Tensor],
    inputs: list[list[int]],
) -> dict[str, Any]:
    """How closely ``candidate`` logits follow ``reference`` ones, against the adapter's own effect.

    Args:
        reference: the evaluated model's logits, one ``(tokens, vocab)`` tensor per conversation.
        candidate: the merged model's logits on the same inputs.
        without_adapter: the evaluated model's logits with the adapter disabled: the scale of the adapter's effect.
        inputs: the token ids (for the next-token NLL).

    Returns:
        ``mean_kl`` (KL(reference || candidate) per position, averaged), ``next_token_agreement`` (share of
        positions where both pick the same greedy token), the adapter's own ``adapter_kl`` and ``adapter_agreement``,
        ``kl_share_of_adapter_effect`` (mean_kl / adapter_kl), and the mean NLL of the conversations' next tokens
        under each model with ``adapter_effect_kept``: (NLL without adapter - NLL merged) / (NLL without adapter -
        NLL evaluated), 1.0 when the merge keeps all of it.
    """
    ref, cand, off = (torch.cat(x) for x in (reference, candidate, without_adapter))
    ref_logp, cand_logp, off_logp = (F.log_softmax(x, dim=-1) for x in (ref, cand, off))

    def kl(logp: torch.Tensor) -> float:  # >= 0 but for float32 rounding (-3e-9 seen for identical models)
        return max(0.0, float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()))

    def nll(parts: list[torch.Tensor]) -> float:
        losses = [F.cross_entropy(x[:-1], torch.tensor(ids[1:]), reduction="sum") for x, ids in zip(parts, inputs)]
        return float(sum(losses) / sum(len(ids) - 1 for ids in inputs))

    top = ref.argmax(-1)
    mean_kl, adapter_kl = kl(cand_logp), kl(off_logp)
    nll_ref, nll_cand, nll_off = nll(reference), nll(candidate), nll(without_adapter)
    gain = nll_off - nll_ref
    return {
        "mean_kl": mean_kl,
        "next_token_agreement": float((cand.argmax(-1) == top).float().mean()),
        "adapter_kl": adapter_kl,
        "adapter_agreement": float((off.argmax(-1) == top).float().mean()),
        "kl_share_of_adapter_effect": mean_kl / adapter_kl if adapter_kl > 0 else 0.0,
        "nll_merged": nll_cand,
        "nll_evaluated": nll_ref,
        "nll_without_adapter": nll_off,
        "adapter_effect_kept": (nll_off - nll_cand) / gain if abs(gain) > 1e-6 else None,
    }


def fidelity_summary(fidelity: dict[str, Any]) -> str:
    """Two lines for the terminal: the merged model against the evaluated one, and the adapter's effect."""
    kept = fidelity["adapter_effect_kept"]
    kept_text = "" if kept is None else f"; {kept:.1%} of the adapter's NLL gain kept"
    return (
        f"fidelity ({fidelity['merge_base']} base, saved in {fidelity['saved_dtype']}) against the evaluated model on "
        f"{fidelity['tokens']} tokens of {fidelity['conversations']}: mean KL {fidelity['mean_kl']:.3g}, next-token "
        f"agreement {fidelity['next_token_agreement']:.1%}\n"
        f"the adapter's own effect: KL {fidelity['adapter_kl']:.3g}, agreement {fidelity['adapter_agreement']:.1%}; "
        f"NLL merged {fidelity['nll_merged']:.4f}, evaluated {fidelity['nll_evaluated']:.4f}, without adapter "
        f"{fidelity['nll_without_adapter']:.4f}{kept_text}"
    )
