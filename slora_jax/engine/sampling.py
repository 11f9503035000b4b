"""On-device sampling: greedy tokens in the step; random ones, grammar masks and log-probabilities in a
second, small program (`finish`), run only for a batch that needs one of them.

The step program returns every row's greedy token (argmax of its logits) and the logits. Most
batches are all greedy (S-LoRA's workload, every benchmark): their tokens are final and nothing else
runs. The host, which built the batch, knows its sampling values and picks what else to run (`plan`):

- nothing, when no row has a temperature;
- temperature only: Gumbel-max over the whole vocabulary, argmax(logits / T + G) with G ~ Gumbel(0, 1)
  per token, which draws exactly from softmax(logits / T) and needs no sort;
- some row with top-k or top-p: the same, restricted to each such row's candidates, taken from the K
  most likely tokens of the batch (`jax.lax.top_k`, K = `TOP_P_CANDIDATES` unless a row asks for a
  larger top-k), never an argsort of the whole vocabulary.

Semantics of the filters: top-k keeps a row's `top_k` most likely tokens; top-p then keeps the
smallest prefix of them whose probability mass, renormalised over the kept candidates, reaches
`top_p`. A row with top-p but no top-k takes its `TOP_P_CANDIDATES` most likely tokens as its
candidates, so its nucleus is cut within them (the mass is renormalised over those tokens, not over
the whole vocabulary): a nucleus wider than that many tokens is truncated to them.

Structured output: a batch with constrained rows passes `mask`, llguidance's token bitmask ([B, ceil(V / 32)]
int32, bit j of word w allows token 32 w + j; all bits set on a row without a constraint). A constrained
row samples among its allowed tokens only (greedy: the most likely allowed one); the other rows' tokens
are exactly those they would sample without the mask.

Log-probabilities (`logprobs`) are those of the raw model distribution, log_softmax(logits), before
temperature, top-k and top-p (vLLM's default `raw_logprobs`); on a constrained row, of the logits with
the grammar's mask applied (vLLM applies the grammar's bitmask before its sampler reads its raw
logprobs): the sampled token's and the `MAX_LOGPROBS` most likely tokens', in one `lax.top_k`.

Reproducible: row r's noise is drawn over the whole vocabulary from fold_in(PRNGKey(seed), n) for its
n-th token and indexed by token id, so a seeded request samples the same tokens whatever batch it runs
in, whichever of the two programs the batch needs and whatever K the batch's other rows ask for.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from .batch import SamplingArrays

TOP_P_CANDIDATES = 256  # candidates of a row with top-p but no top-k (and the least K of the filter path)
MAX_LOGPROBS = 20  # most likely tokens whose log-probabilities a row may ask for (OpenAI's chat limit)


def greedy(logits: jax.Array) -> jax.Array:
    """[B, V] -> [B] int32: each row's most likely token."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def plan(s: SamplingArrays) -> Optional[int]:
    """Host side: what a batch needs beyond its greedy tokens.

    None: every row is greedy (a masked batch still runs `sample`, for its constrained rows); 0: temperature only (Gumbel-max over the vocabulary); K > 0: some row
    filters (top-k / top-p) and the filter path takes the K most likely tokens of each row (a power of
    two >= TOP_P_CANDIDATES and >= the largest top-k asked; the program clips it to the vocabulary).
    """
    hot = np.asarray(s.temperature) > 0
    if not hot.any():
        return None
    top_k, top_p = np.asarray(s.top_k)[hot], np.asarray(s.top_p)[hot]
    if not ((top_k > 0).any() or (top_p < 1).any()):
        return 0
    largest = int(top_k.max())
    return max(TOP_P_CANDIDATES, 1 << max(largest - 1, 0).bit_length())


def row_keys(s: SamplingArrays) -> jax.Array:
    """The key of each row's next token: fold_in(PRNGKey(seed), tokens generated so far)."""
    return jax.vmap(lambda seed, n: jax.random.fold_in(jax.random.PRNGKey(seed), n))(s.seeds, s.counters)


def unpack_mask(mask: jax.Array, v: int) -> jax.Array:
    """[B, W] int32 bitmask -> [B, v] bool: bit j of word w allows token 32 w + j."""
    bits = (mask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    return bits.reshape(mask.shape[0], -1)[:, :v].astype(bool)


def sample(logits: jax.Array, s: SamplingArrays, tokens: jax.Array, k: Optional[int],
           mask: Optional[jax.Array] = None) -> jax.Array:
    """`tokens` ([>= B] int32, the greedy ones) with the rows of temperature > 0 drawn at random, and the
    constrained rows of `mask` (if any) kept to their allowed tokens.

    k = `plan(s)`: None draws nothing (only a mask to apply); 0 draws from softmax(logits / T) over the
    vocabulary; k > 0 also applies each row's top-k / top-p within its candidates (module docstring).
    """
    b, v = logits.shape
    allowed = None
    if mask is not None:
        allowed = unpack_mask(mask, v)
        constrained = (mask != -1).any(axis=-1)  # the other rows keep the step's own argmax, bit for bit
        best = jnp.argmax(jnp.where(allowed, logits, -jnp.inf), axis=-1).astype(jnp.int32)
        tokens = tokens.at[:b].set(jnp.where(constrained, best, tokens[:b]))
    if k is None:
        return tokens
    x = logits.astype(jnp.float32) / jnp.maximum(s.temperature, 1e-6)[:, None]
    if allowed is not None:
        x = jnp.where(allowed, x, -jnp.inf)
    noise = jax.vmap(lambda key: jax.random.gumbel(key, (v,), jnp.float32))(row_keys(s))  # [B, V] by token id
    drawn = jnp.argmax(x + noise, axis=-1)
    if k:
        k = min(int(k), v)
        vals, ids = jax.lax.top_k(x, k)  # [B, k], most likely first
        limit = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, k), min(TOP_P_CANDIDATES, k))
        keep = jnp.arange(k)[None, :] < limit[:, None]
        probs = jax.nn.softmax(jnp.where(keep, vals, -jnp.inf), axis=-1)
        keep &= jnp.cumsum(probs, axis=-1) - probs < s.top_p[:, None]  # mass strictly before the token
        pick = jnp.argmax(jnp.where(keep, vals + jnp.take_along_axis(noise, ids, axis=-1), -jnp.inf), axis=-1)
        filtered = jnp.take_along_axis(ids, pick[:, None], axis=-1)[:, 0]
        drawn = jnp.where((s.top_k > 0) | (s.top_p < 1), filtered, drawn)
    return tokens.at[:b].set(jnp.where(s.temperature > 0, drawn.astype(jnp.int32), tokens[:b]))


def logprobs(logits: jax.Array, tokens: jax.Array, mask: Optional[jax.Array] = None) -> tuple:
    """Row i's log-probability of `tokens[i]` [B], and its `MAX_LOGPROBS` most likely tokens' log-probabilities
    [B, K] (descending) and ids [B, K], from log_softmax(logits) (masked, on the rows of `mask`)."""
    b, v = logits.shape
    x = logits.astype(jnp.float32)
    if mask is not None:
        x = jnp.where(unpack_mask(mask, v), x, -jnp.inf)
    lp = jax.nn.log_softmax(x, axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[:b, None], axis=-1)[:, 0]
    top, ids = jax.lax.top_k(lp, min(MAX_LOGPROBS, v))
    return chosen, top, ids.astype(jnp.int32)


def finish(logits: jax.Array, s: SamplingArrays, tokens: jax.Array, mask: Optional[jax.Array] = None, *,
           k: Optional[int], want_logprobs: bool = False) -> tuple:
    """The sampling program: (tokens, `logprobs` of them or None). The runner compiles one per (k, masked,
    want_logprobs) and batch shape, and runs it only when a batch needs one of them."""
    tokens = sample(logits, s, tokens, k, mask)
    return tokens, (logprobs(logits, tokens, mask) if want_logprobs else None)


def sample_all(logits: jax.Array, s: SamplingArrays, mask: Optional[jax.Array] = None) -> jax.Array:
    """Greedy, then whatever `plan` says: the engine's tokens for these logits, in one call (tests, tools)."""
    tokens = greedy(logits)
    k = plan(s)
    return tokens if k is None and mask is None else sample(logits, s, tokens, k, mask)
