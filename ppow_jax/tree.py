"""Dynamic draft trees (EAGLE-2) and their verification, as fixed-shape array functions.

A tree per row has ``N + 1`` nodes: node 0 is the root (the pending token, already committed
but not yet fed to the target) and nodes ``1..N`` are drafted tokens in topological order
(a parent always has a smaller index than its children). Everything is batched over rows and
has static shapes, so one compiled round serves every row whatever tree it drew.

Construction (EAGLE-2): the root's draft distribution gives ``top_k`` children; then for
``depth - 1`` steps the ``top_k`` best nodes of the last layer (by cumulative draft
log-probability) are each expanded into ``top_k`` children. Every expanded child is a
candidate; the tree keeps the ``total_tokens`` best candidates. Since a child's score never
exceeds its parent's, the kept set is closed under ancestors (ties go to the earlier
candidate, and parents are always earlier).

Verification: greedy acceptance walks down from the root, following the child whose token is
the target's argmax at the parent. Sampling acceptance tries the children of the current node
in order (SpecInfer's multi-candidate rule). Tree children are chosen deterministically
(top-k) given the draft, so each try proposes a point mass: child ``x`` is accepted with
probability ``r(x)`` under the current residual ``r`` (initially the target's ``p`` at the
node), and on rejection ``r ← norm(max(r − δ_x, 0))``, i.e. ``x`` is removed. When all
children are rejected the next token is drawn from ``r``. The committed tokens are then
distributed exactly as the target's own samples.
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp

from ppow_jax import sampling
from ppow_jax.errors import UserError

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TreeShape:
  """EAGLE-2 tree size: kept draft tokens, expansion steps (max path length), branching."""
  total_tokens: int = 60
  depth: int = 7
  top_k: int = 10

  def __post_init__(self):
    for name in ("total_tokens", "depth", "top_k"):
      if getattr(self, name) < 1:
        raise UserError(f"tree {name} must be >= 1, got {getattr(self, name)}")
    if self.total_tokens > self.num_candidates:
      raise UserError(f"tree total_tokens={self.total_tokens} exceeds the {self.num_candidates} "
                      f"candidates that depth={self.depth}, top_k={self.top_k} produce")

  @property
  def num_candidates(self) -> int:
    return self.top_k + (self.depth - 1) * self.top_k * self.top_k

  @classmethod
  def parse(cls, text: str) -> "TreeShape":
    """``"TOTAL,DEPTH,TOPK"`` (the CLI form)."""
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
      raise UserError(f"--tree expects TOTAL,DEPTH,TOPK (three integers), got {text!r}")
    return cls(*(int(p) for p in parts))


@flax.struct.dataclass
class Tree:
  """One draft tree per row (node 0 = root). ``child_BxN1xK[b, u, j]`` is the j-th child of u
  (in index order) or -1; ``mask_BxN1xN1[b, i, j]`` says j is an ancestor of i or i itself."""
  tokens_BxN1: Array  # int32
  parent_BxN1: Array  # int32, -1 at the root
  depth_BxN1: Array  # int32, 0 at the root
  mask_BxN1xN1: Array  # bool
  child_BxN1xK: Array  # int32


@flax.struct.dataclass
class TreeAccept:
  """Outcome of verifying a tree: the accepted root path and the committed tokens."""
  num_accepted_B: Array  # int32 a in [0, depth]
  path_BxD: Array  # int32 node ids of the accepted path (depths 1..a), 0 past a
  committed_BxD1: Array  # int32 the a path tokens then the target's next token; -1 past a
  next_token_B: Array  # int32


# ------------------------------------------------------------------------- construction


def expand(scores_BxM: Array, logp_BxMxV: Array, top_k: int) -> tuple[Array, Array, Array]:
  """The ``top_k`` children of each of M nodes: tokens, cumulative scores, parent slot (in M).

  All [B, M * top_k], ordered parent-major so that earlier parents' children come first.
  """
  b, m, _ = logp_BxMxV.shape
  child_logp_BxMxK, tokens_BxMxK = jax.lax.top_k(logp_BxMxV, top_k)
  scores_BxMxK = scores_BxM[:, :, None] + child_logp_BxMxK
  parent_BxMxK = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32)[None, :, None], (b, m, top_k))
  flat = lambda x: x.reshape(b, m * top_k)
  return flat(tokens_BxMxK).astype(jnp.int32), flat(scores_BxMxK), flat(parent_BxMxK)


def ancestor_mask(parent_BxN1: Array, max_depth: int) -> Array:
  """[B, N+1, N+1] bool: j is i or an ancestor of i (following at most ``max_depth`` links)."""
  b, n1 = parent_BxN1.shape
  node_N1 = jnp.arange(n1, dtype=jnp.int32)
  cur_BxN1 = jnp.broadcast_to(node_N1[None], (b, n1))
  mask = jnp.zeros((b, n1, n1), bool)
  for _ in range(max_depth + 1):
    mask |= (cur_BxN1[:, :, None] == node_N1[None, None, :]) & (cur_BxN1 >= 0)[:, :, None]
    cur_BxN1 = jnp.where(cur_BxN1 > 0, jnp.take_along_axis(parent_BxN1, jnp.maximum(cur_BxN1, 0),
                                                           axis=1), -1)
  return mask


def children_table(parent_BxN1: Array, top_k: int) -> Array:
  """[B, N+1, top_k]: the j-th child (index order) of each node, -1 where there is none."""
  b, n1 = parent_BxN1.shape
  node_N1 = jnp.arange(n1, dtype=jnp.int32)
  same_BxN1xN1 = parent_BxN1[:, :, None] == parent_BxN1[:, None, :]
  rank_BxN1 = jnp.sum(same_BxN1xN1 & (node_N1[None, None, :] < node_N1[None, :, None]), axis=2)
  # the root (parent -1) goes out of bounds and is dropped
  rows_BxN1 = jnp.broadcast_to(jnp.arange(b)[:, None], (b, n1))
  parent_slot = jnp.where(parent_BxN1 >= 0, parent_BxN1, n1)
  table = jnp.full((b, n1, top_k), -1, jnp.int32)
  return table.at[rows_BxN1, parent_slot, rank_BxN1].set(
      jnp.broadcast_to(node_N1[None], (b, n1)), mode="drop")


def select(root_B: Array, cand_tokens_BxC: Array, cand_scores_BxC: Array, cand_parent_BxC: Array,
           cand_depth_BxC: Array, total_tokens: int, top_k: int, depth: int) -> Tree:
  """Keep the ``total_tokens`` best candidates (``cand_parent`` = candidate index, -1 = root).

  Candidates must be listed parents first; kept nodes keep that order, so the tree is
  topologically ordered.
  """
  b = root_B.shape[0]
  _, keep_BxN = jax.lax.top_k(cand_scores_BxC, total_tokens)
  keep_BxN = jnp.sort(keep_BxN, axis=1)
  take = lambda x: jnp.take_along_axis(x, keep_BxN, axis=1)
  # candidate index -> node index (1-based); the root candidate -1 maps to node 0
  c = cand_tokens_BxC.shape[1]
  node_of_BxC = jnp.zeros((b, c), jnp.int32).at[
      jnp.arange(b)[:, None], keep_BxN].set(jnp.arange(1, total_tokens + 1, dtype=jnp.int32))
  par_cand_BxN = take(cand_parent_BxC)
  par_node_BxN = jnp.where(par_cand_BxN >= 0,
                           jnp.take_along_axis(node_of_BxC, jnp.maximum(par_cand_BxN, 0), 1), 0)
  tokens = jnp.concatenate([root_B[:, None].astype(jnp.int32), take(cand_tokens_BxC)], axis=1)
  parent = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), par_node_BxN], axis=1)
  depth_BxN1 = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), take(cand_depth_BxC)], axis=1)
  return Tree(tokens, parent, depth_BxN1, ancestor_mask(parent, depth),
              children_table(parent, top_k))


def grow(root_B: Array, root_logits_BxV: Array, step_fn, carry, shape: TreeShape
         ) -> tuple[Tree, object]:
  """Build the EAGLE-2 tree of every row; the drafter is reached only through ``step_fn``.

  ``step_fn(carry, tokens_BxK, parent_BxK, step, fed_mask_BxKxF) -> (carry, logits_BxKxV)``
  feeds the K = top_k frontier nodes of depth ``step`` (1 .. depth-1). Frontier node m is fed
  into slot ``f = (step - 1) * K + m`` of the drafter's tree region; ``fed_mask[b, m, f']``
  says slot f' holds m itself or one of its ancestors (what m may attend to besides the
  committed context), and ``parent_BxK`` indexes the previous step's frontier (0 at step 1,
  whose parent is the root). Scores are cumulative draft log-probabilities at temperature 1.
  """
  k, d = shape.top_k, shape.depth
  b = root_B.shape[0]
  f = (d - 1) * k
  logp_Bx1xV = jax.nn.log_softmax(root_logits_BxV.astype(jnp.float32), axis=-1)[:, None]
  tok_BxK, score_BxK, _ = expand(jnp.zeros((b, 1), jnp.float32), logp_Bx1xV, k)
  cands = [(tok_BxK, score_BxK, jnp.full((b, k), -1, jnp.int32), jnp.ones((b, k), jnp.int32))]
  front_cand_BxK = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32)[None], (b, k))
  front_parent_BxK = jnp.zeros((b, k), jnp.int32)
  anc_BxKxF = jnp.zeros((b, k, f), bool)
  offset = k
  for step in range(1, d):
    own_KxF = jnp.arange(f)[None, :] == (step - 1) * k + jnp.arange(k)[:, None]
    fed_BxKxF = anc_BxKxF | own_KxF[None]
    carry, logits_BxKxV = step_fn(carry, tok_BxK, front_parent_BxK, step, fed_BxKxF)
    logp_BxKxV = jax.nn.log_softmax(logits_BxKxV.astype(jnp.float32), axis=-1)
    ctok_BxC, cscore_BxC, cslot_BxC = expand(score_BxK, logp_BxKxV, k)
    cands.append((ctok_BxC, cscore_BxC, jnp.take_along_axis(front_cand_BxK, cslot_BxC, axis=1),
                  jnp.full((b, k * k), step + 1, jnp.int32)))
    score_BxK, best_BxK = jax.lax.top_k(cscore_BxC, k)
    tok_BxK = jnp.take_along_axis(ctok_BxC, best_BxK, axis=1)
    front_parent_BxK = jnp.take_along_axis(cslot_BxC, best_BxK, axis=1)
    front_cand_BxK = offset + best_BxK.astype(jnp.int32)
    anc_BxKxF = jnp.take_along_axis(fed_BxKxF, front_parent_BxK[:, :, None], axis=1)
    offset += k * k
  cat = lambda i: jnp.concatenate([c[i] for c in cands], axis=1)
  return select(root_B, cat(0), cat(1), cat(2), cat(3), shape.total_tokens, k, d), carry


# ------------------------------------------------------------------------- verification


def _walk(tree: Tree, depth: int, pick_child):
  """Walk down from the root; ``pick_child(step, u_B, alive_B)`` -> (child node or -1, aux)."""
  b = tree.tokens_BxN1.shape[0]
  u_B = jnp.zeros((b,), jnp.int32)
  alive_B = jnp.ones((b,), bool)
  path = []
  for step in range(depth):
    c_B = pick_child(step, u_B, alive_B)
    alive_B = alive_B & (c_B >= 0)
    u_B = jnp.where(alive_B, c_B, u_B)
    path.append(jnp.where(alive_B, c_B, 0))
  return u_B, jnp.stack(path, axis=1)


def _result(tree: Tree, path_BxD: Array, next_B: Array) -> TreeAccept:
  a_B = jnp.sum(path_BxD > 0, axis=1).astype(jnp.int32)
  toks_BxD = jnp.take_along_axis(tree.tokens_BxN1, path_BxD, axis=1)
  d = path_BxD.shape[1]
  idx_D1 = jnp.arange(d + 1)
  committed = jnp.concatenate([toks_BxD, jnp.zeros_like(next_B)[:, None]], axis=1)
  committed = jnp.where(idx_D1[None] == a_B[:, None], next_B[:, None], committed)
  committed = jnp.where(idx_D1[None] > a_B[:, None], -1, committed)
  return TreeAccept(a_B, path_BxD, committed.astype(jnp.int32), next_B.astype(jnp.int32))


def greedy_accept(tree: Tree, target_logits_BxN1xV: Array, depth: int) -> TreeAccept:
  """The longest root path whose every token is the target's argmax at its parent."""
  argmax_BxN1 = sampling.greedy(target_logits_BxN1xV)

  def pick(step, u_B, alive_B):
    del step
    kids_BxK = jnp.take_along_axis(tree.child_BxN1xK, u_B[:, None, None], axis=1)[:, 0]
    kid_tok_BxK = jnp.take_along_axis(tree.tokens_BxN1, jnp.maximum(kids_BxK, 0), axis=1)
    want_B = jnp.take_along_axis(argmax_BxN1, u_B[:, None], axis=1)
    hit_BxK = (kids_BxK >= 0) & (kid_tok_BxK == want_B) & alive_B[:, None]
    return jnp.where(jnp.any(hit_BxK, axis=1),
                     jnp.take_along_axis(kids_BxK, jnp.argmax(hit_BxK, axis=1)[:, None], 1)[:, 0],
                     -1)

  u_B, path_BxD = _walk(tree, depth, pick)
  return _result(tree, path_BxD, jnp.take_along_axis(argmax_BxN1, u_B[:, None], axis=1)[:, 0])


def rejection_accept(rng: Array, tree: Tree, target_probs_BxN1xV: Array,
                     depth: int) -> TreeAccept:
  """Lossless multi-candidate recursive rejection over siblings (see the module docstring)."""
  b, _, v = target_probs_BxN1xV.shape
  k = tree.child_BxN1xK.shape[2]
  k_unif, k_next = jax.random.split(rng)
  unif_DxKxB = jax.random.uniform(k_unif, (depth, k, b), jnp.float32)
  residual = {"p": jnp.zeros((b, v), jnp.float32)}

  def pick(step, u_B, alive_B):
    r_BxV = jnp.take_along_axis(target_probs_BxN1xV, u_B[:, None, None], axis=1)[:, 0]
    kids_BxK = jnp.take_along_axis(tree.child_BxN1xK, u_B[:, None, None], axis=1)[:, 0]
    chosen_B = jnp.full((b,), -1, jnp.int32)
    for j in range(k):
      c_B = kids_BxK[:, j]
      x_B = jnp.take_along_axis(tree.tokens_BxN1, jnp.maximum(c_B, 0)[:, None], 1)[:, 0]
      trying_B = alive_B & (c_B >= 0) & (chosen_B < 0)
      px_B = jnp.take_along_axis(r_BxV, x_B[:, None], axis=1)[:, 0]
      ok_B = trying_B & (unif_DxKxB[step, j] * jnp.sum(r_BxV, axis=1) < px_B)
      chosen_B = jnp.where(ok_B, c_B, chosen_B)
      drop_BxV = (trying_B & ~ok_B)[:, None] & (jnp.arange(v)[None] == x_B[:, None])
      r_BxV = jnp.where(drop_BxV, 0.0, r_BxV)
    # the residual of the node where the walk stops
    residual["p"] = jnp.where((alive_B & (chosen_B < 0))[:, None], r_BxV, residual["p"])
    return chosen_B

  u_B, path_BxD = _walk(tree, depth, pick)
  # a walk that reached depth `depth` stops at a leaf: the next token comes from p there
  at_leaf_B = jnp.sum(path_BxD > 0, axis=1) == depth
  p_leaf_BxV = jnp.take_along_axis(target_probs_BxN1xV, u_B[:, None, None], axis=1)[:, 0]
  r_BxV = jnp.where(at_leaf_B[:, None], p_leaf_BxV, residual["p"])
  return _result(tree, path_BxD, sampling.sample(k_next, r_BxV))
