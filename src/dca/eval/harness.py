"""An lm-evaluation-harness model: any lm-eval task, scored with the cache augmented once per request.

    from dca.eval.harness import DCALM
    lm = DCALM(model, tokenizer)                   # augments when the model has a coprocessor
    base = DCALM(model, tokenizer, augment=False)  # the same decoder without latents
    lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"])   # needs the full lm_eval install and task data

Where the coprocessor runs (the paper: once, at the end of the prompt):
- `loglikelihood`: after each request's context, before the continuation (as `dca.eval.benchmarks`);
- `generate_until`: after each request's context, then greedy (or sampled) decoding;
- `loglikelihood_rolling`: never. A rolling log-likelihood (perplexity of a whole text) has no prompt
  and so no "end of the prompt": it is the plain decoder's, exactly as lm-eval's HF model computes
  it. Table 1-style "perplexity after an augmentation point" lives in `dca.eval.evaluate` instead.

Importing this module needs `lm_eval` (`pip install --no-deps lm_eval==0.4.13` is enough for it);
nothing else in dca imports it.
"""

from __future__ import annotations

from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from dca.eval.scoring import generate_texts, loglikelihood_ids, prefix_token_id
from dca.model import AugmentedLM


class DCALM(TemplateLM):
    """`lm_eval.api.model.LM` over an `AugmentedLM` (TemplateLM: lm-eval's own context/continuation split)."""

    def __init__(self, model: AugmentedLM, tokenizer: PreTrainedTokenizerBase, *, augment: bool | None = None,
                 batch_size: int = 8, max_length: int | None = None, max_gen_toks: int = 256):
        super().__init__()
        if augment and model.coprocessor is None:
            raise ValueError("augment=True needs a coprocessor; this AugmentedLM is a plain base model")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.augment = model.coprocessor is not None if augment is None else augment
        self.batch_size, self.max_gen_toks = batch_size, max_gen_toks
        config = model.decoder.config
        lengths = (getattr(config, a, None) for a in ("n_positions", "max_position_embeddings", "n_ctx"))
        self._max_length = max_length or next((n for n in lengths if n), 2048)  # as lm-eval's HF model

    # ------------------------------------------------------------------ what TemplateLM needs
    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def latent_positions(self) -> int:
        """Position ids the latents take before each continuation (0 without augmentation, and 0 for
        latents that take cache entries but no positions: `CoprocessorConfig.latent_positions`)."""
        return self.model.coprocessor.config.positions_taken if self.augment else 0

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return prefix_token_id(self.tokenizer)

    @property
    def device(self):
        return self.model.device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            # as lm-eval's HF model: a string that already starts with BOS gets no second one
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer(string, add_special_tokens=add_special_tokens).input_ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids), from `TemplateLM.loglikelihood`."""
        pairs = []
        for _, ctx, cont in requests:
            # decoder positions: context + latents (if they take any) + continuation[:-1]; the context gives
            # way on the left
            keep = self.max_length + 1 - self.latent_positions - len(cont)
            if keep < 1:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit in max_length={self.max_length} "
                                 f"with latents taking {self.latent_positions} positions")
            pairs.append((ctx[-keep:], cont))
        results = loglikelihood_ids(self.model, pairs, augment=self.augment, batch_size=self.batch_size)
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    # ------------------------------------------------------------------ the LM interface
    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood with the plain decoder (no prompt end, so no augmentation point)."""
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(string, add_special_tokens=False)
            for window in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append(window)
                owners.append(i)
        scores = loglikelihood_ids(self.model, windows, augment=False, batch_size=self.batch_size)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owners, scores, strict=True):
            totals[i] += ll
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Generation from each context, augmented once at its end, cut at the first `until` string."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)  # one generate config per group
        eos = self.tokenizer.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        for indices in tqdm(groups.values(), disable=disable_tqdm, desc="generate_until groups"):
            kwargs = dict(requests[indices[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eos and eos not in until:
                until.append(eos)
            max_new = int(kwargs.pop("max_gen_toks", kwargs.pop("max_new_tokens", self.max_gen_toks)))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            do_sample = bool(kwargs.pop("do_sample", False)) and temperature > 0
            sampling = {"do_sample": True, "temperature": temperature, **kwargs} if do_sample else {}
            keep = self.max_length - max_new - self.latent_positions
            if keep < 1:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a context in max_length={self.max_length}")
            prompts = [(self.tok_encode(requests[i].args[0]) or [self.prefix_token_id])[-keep:] for i in indices]
            texts = generate_texts(self.model, self.tokenizer, prompts, augment=self.augment, max_new_tokens=max_new,
                                   stop=until, batch_size=self.batch_size, **sampling)
            for i, text in zip(indices, texts, strict=True):
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return [r if r is not None else "" for r in results]
