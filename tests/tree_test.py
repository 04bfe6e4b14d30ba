"""Draft-tree bookkeeping and verification against plain numpy references."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats as scipy_stats

from ppow_jax import tree
from ppow_jax.errors import UserError


def _log_softmax(x):
  x = x - x.max()
  return x - np.log(np.exp(x).sum())


def _ref_grow(root_logits, w_VxV, shape):
  """EAGLE-2 by hand: node logits = Σ over the node's path of W[token] (root: root_logits)."""
  k = shape.top_k
  logits = lambda path: root_logits if not path else w_VxV[list(path)].sum(0)
  cands, frontier = [], [((), 0.0)]
  for _ in range(shape.depth):
    new = []
    for path, score in frontier:
      lp = _log_softmax(logits(path))
      for x in np.argsort(-lp, kind="stable")[:k]:
        new.append((path + (int(x),), score + lp[x]))
    cands += new
    frontier = sorted(new, key=lambda c: -c[1])[:k]
  kept = sorted(cands, key=lambda c: -c[1])[:shape.total_tokens]
  return {c[0] for c in kept}


_greedy_accept = jax.jit(tree.greedy_accept, static_argnums=2)
_rejection_accept = jax.jit(tree.rejection_accept, static_argnums=3)


def _path_sum_step(w_VxV, k, f):
  """A fake drafter whose logits at a node are Σ W[token] over the fed slots it may see."""

  def step_fn(fed_tok_BxF, tokens_BxK, parent_BxK, step, fed_BxKxF):
    del parent_BxK
    fed_tok_BxF = fed_tok_BxF.at[:, (step - 1) * k:step * k].set(tokens_BxK)
    rows_BxKxFxV = w_VxV[fed_tok_BxF][:, None] * fed_BxKxF[..., None]
    return fed_tok_BxF, rows_BxKxFxV.sum(2)

  return step_fn, jnp.zeros((1, f), jnp.int32)


def _paths(t, b):
  toks, par = np.asarray(t.tokens_BxN1[b]), np.asarray(t.parent_BxN1[b])
  out = []
  for i in range(1, len(toks)):
    path, u = [], i
    while u > 0:
      path.append(int(toks[u]))
      u = par[u]
    out.append(tuple(path[::-1]))
  return out


class _RaiseOnRankPromotion(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.enterContext(jax.numpy_rank_promotion("raise"))


class GrowTest(_RaiseOnRankPromotion):

  def test_matches_reference_eagle2(self):
    v = 12
    rng = np.random.default_rng(0)
    for shape in (tree.TreeShape(9, 3, 3), tree.TreeShape(20, 4, 4), tree.TreeShape(2, 2, 2)):
      root = rng.normal(size=v).astype(np.float32) * 2
      w = rng.normal(size=(v, v)).astype(np.float32) * 2
      step_fn, carry = _path_sum_step(jnp.asarray(w), shape.top_k,
                                      (shape.depth - 1) * shape.top_k)
      grow = jax.jit(lambda r, l, c: tree.grow(r, l, step_fn, c, shape))  # pylint: disable=cell-var-from-loop
      t, _ = grow(jnp.asarray([7]), jnp.asarray(root)[None], carry)
      paths = _paths(t, 0)
      self.assertEqual(set(paths), _ref_grow(root, w, shape))
      self.assertLen(paths, shape.total_tokens)
      par = np.asarray(t.parent_BxN1[0])
      self.assertTrue((par[1:] < np.arange(1, len(par))).all())  # topological order
      np.testing.assert_array_equal(np.asarray(t.depth_BxN1[0, 1:]), [len(p) for p in paths])
      mask = np.asarray(t.mask_BxN1xN1[0])
      for i in range(len(par)):
        anc = {i}
        while par[min(anc)] >= 0 and min(anc) > 0:
          anc.add(par[min(anc)])
        self.assertEqual(set(np.flatnonzero(mask[i])), anc | {0})

  def test_bad_shapes(self):
    with self.assertRaisesRegex(UserError, "exceeds"):
      tree.TreeShape(100, 2, 3)
    with self.assertRaisesRegex(UserError, "TOTAL,DEPTH,TOPK"):
      tree.TreeShape.parse("60,7")
    self.assertEqual(tree.TreeShape.parse("60,7,10"), tree.TreeShape(60, 7, 10))


# root r; children a(1)=5, b(2)=3; a's children c(3)=2, d(4)=7; b's child e(5)=1; d's child f(6)=4
TOKENS = [9, 5, 3, 2, 7, 1, 4]
PARENTS = [-1, 0, 0, 1, 1, 2, 4]
V = 10


def _hand_tree(batch=1):
  parent = jnp.asarray([PARENTS] * batch, jnp.int32)
  depth = np.zeros(len(PARENTS), np.int32)
  for i, p in enumerate(PARENTS[1:], 1):
    depth[i] = depth[p] + 1
  return tree.Tree(jnp.asarray([TOKENS] * batch, jnp.int32), parent,
                   jnp.asarray([depth] * batch), tree.ancestor_mask(parent, 3),
                   tree.children_table(parent, 2))


def _ref_greedy(argmax):
  u, path = 0, []
  while True:
    kids = [i for i, p in enumerate(PARENTS) if p == u and TOKENS[i] == argmax[u]]
    if not kids:
      return path, argmax[u]
    u = kids[0]
    path.append(u)


class GreedyAcceptTest(_RaiseOnRankPromotion):

  def test_hand_built_tree(self):
    t = _hand_tree()
    cases = {  # argmax per node -> expected (path node ids, committed tokens)
        (5, 7, 0, 0, 4, 0, 8): ([1, 4, 6], [5, 7, 4, 8]),
        (3, 0, 1, 0, 0, 6, 0): ([2, 5], [3, 1, 6]),
        (5, 2, 0, 3, 0, 0, 0): ([1, 3], [5, 2, 3]),
        (4, 0, 0, 0, 0, 0, 0): ([], [4]),
        (5, 8, 0, 0, 0, 0, 0): ([1], [5, 8]),
    }
    for argmax, (path, committed) in cases.items():
      self.assertEqual(_ref_greedy(list(argmax)), (path, committed[-1]))
      logits = jax.nn.one_hot(jnp.asarray(argmax), V)[None] * 3.0
      res = _greedy_accept(t, logits, 3)
      a = int(res.num_accepted_B[0])
      self.assertEqual(a, len(path))
      self.assertEqual(np.asarray(res.path_BxD[0, :a]).tolist(), path)
      self.assertEqual(np.asarray(res.committed_BxD1[0, :a + 1]).tolist(), committed)
      self.assertTrue((np.asarray(res.committed_BxD1[0, a + 1:]) == -1).all())

  def test_one_hot_rejection_equals_greedy(self):
    t = _hand_tree(batch=5)
    argmax = jnp.asarray([[5, 7, 0, 0, 4, 0, 8], [3, 0, 1, 0, 0, 6, 0], [4, 0, 0, 0, 0, 0, 0],
                          [5, 2, 0, 3, 0, 0, 0], [5, 8, 0, 0, 0, 0, 0]])
    logits = jax.nn.one_hot(argmax, V) * 3.0
    g = _greedy_accept(t, logits, 3)
    r = _rejection_accept(jax.random.PRNGKey(0), t, jax.nn.one_hot(argmax, V), 3)
    np.testing.assert_array_equal(g.committed_BxD1, r.committed_BxD1)
    np.testing.assert_array_equal(g.path_BxD, r.path_BxD)


def _broken_first_two(rng, p0, p1_VxV, n):
  """The sibling rule without the residual update (rejected tokens stay in p): biased."""
  t1 = np.full(n, -1)
  for x in (5, 3):  # the root's children in order
    acc = (t1 < 0) & (rng.random(n) < p0[x])
    t1[acc] = x
  rest = t1 < 0
  t1[rest] = _draw(rng, np.broadcast_to(p0, (rest.sum(), len(p0))))
  return t1, _draw(rng, p1_VxV[t1])


def _draw(rng, p_NxV):
  cdf = np.cumsum(p_NxV, axis=1)
  u = rng.random(len(p_NxV))[:, None] * cdf[:, -1:]
  return np.minimum((u >= cdf).sum(1), p_NxV.shape[1] - 1)


def _chi2_pvalue(t1, t2, p0, p1_VxV):
  counts = np.zeros((V, V))
  np.add.at(counts, (t1, t2), 1)
  expected = p0[:, None] * p1_VxV * len(t1)
  keep = expected > 5
  self_check = counts[~keep].sum()
  stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
  return scipy_stats.chi2.sf(stat, keep.sum() - 1), self_check


class RejectionAcceptTest(_RaiseOnRankPromotion):

  def test_joint_of_first_two_tokens_is_the_target(self):
    n = 60000
    rng = np.random.default_rng(1)
    p0 = rng.dirichlet(np.ones(V) * 2)
    p1 = rng.dirichlet(np.ones(V) * 2, size=V)  # p(t2 | t1)
    node_p = np.stack([p0] + [p1[x] for x in TOKENS[1:]])  # a node's p is p(. | its token)
    node_p[3:] = rng.dirichlet(np.ones(V), size=4)  # depth-2 nodes: irrelevant to (t1, t2)
    t = _hand_tree(batch=n)
    probs = jnp.broadcast_to(jnp.asarray(node_p, jnp.float32)[None], (n,) + node_p.shape)
    res = _rejection_accept(jax.random.PRNGKey(2), t, probs, 3)
    committed = np.asarray(res.committed_BxD1)
    t1 = committed[:, 0]
    # a round that ends at t1 leaves t2 to the next round, which samples p(. | t1)
    t2 = np.where(committed[:, 1] >= 0, committed[:, 1], _draw(rng, p1[t1]))
    pval, stray = _chi2_pvalue(t1, t2, p0, p1)
    self.assertGreater(pval, 1e-3)
    self.assertLess(stray, 0.01 * n)
    # the test has power: forgetting the residual update is detected
    bt1, bt2 = _broken_first_two(rng, p0, p1, n)
    self.assertLess(_chi2_pvalue(bt1, bt2, p0, p1)[0], 1e-6)


if __name__ == "__main__":
  absltest.main()
