"""Every numeric setting is checked before any work; typed views have one source of values."""

import dataclasses
import os

from absl.testing import absltest, parameterized
import jax

from ppow_jax import cli, rewards, rollout, settings, stages, train_step, tree
from ppow_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "tiny.py:smoke")
NUMERIC = sorted(settings.numeric_leaves(cli.load_config(SMOKE)))


def _with(c, key: str, value):
  c = c.copy_and_resolve_references()
  node, parts = c, key.split(".")
  for part in parts[:-1]:
    node = node[part]
  current = node[parts[-1]]
  node[parts[-1]] = (tuple(type(x)(value) for x in current) if isinstance(current, tuple)
                     else type(current)(value))
  return c


class NumericSweepTest(parameterized.TestCase):
  """Each numeric field at 0 and at -1: valid by its rule, or a UserError naming it."""

  def setUp(self):
    super().setUp()
    self.enterContext(jax.numpy_rank_promotion("raise"))

  def test_every_numeric_field_has_a_rule(self):
    self.assertGreater(len(NUMERIC), 50)
    self.assertEqual([k for k in NUMERIC if settings.rule_for(k) is None], [])

  @parameterized.parameters(*NUMERIC)
  def test_zero_and_negative(self, key):
    base = cli.load_config(SMOKE)
    ok, text = settings.rule_for(key)
    for value in (0, -1):
      c = _with(base, key, value)
      if ok(value):  # accepted by its rule: valid, or refused with the other field named
        try:
          settings.validate(c)
        except UserError as e:
          self.assertIn(f"config.{key}=", str(e))
      else:
        with self.assertRaisesRegex(UserError, "config." + key.replace(".", r"\.") + "="):
          settings.validate(c)

  def test_rules_reject_what_used_to_crash_late(self):
    base = cli.load_config(SMOKE)
    for key in ("target.num_heads", "checkpoint.save_every", "log_every", "eval.batch_sizes",
                "mesh.num_devices"):
      with self.assertRaisesRegex(UserError, key.replace(".", r"\.")):
        settings.validate(_with(base, key, 0))

  def test_cross_field_checks_name_both_fields(self):
    c = cli.load_config(SMOKE)
    c.target.num_heads = 3
    with self.assertRaisesRegex(UserError, r"target\.hidden_size=32 .*target\.num_heads=3"):
      settings.validate(c)
    c = cli.load_config(SMOKE)
    c.eval.batch_sizes = (4,)
    with self.assertRaisesRegex(UserError, r"eval\.batch_sizes=\(4,\).*num_prompts=2"):
      settings.validate(c)
    c = cli.load_config(SMOKE)
    c.data.heldout_fraction = 0.0
    with self.assertRaisesRegex(UserError, "heldout_fraction=0"):
      settings.validate(c)
    c.eval.prompts_file = "prompts.jsonl"
    settings.validate(c)

  def test_eval_tree_is_off_or_a_valid_shape(self):
    c = cli.load_config(SMOKE)
    for off in ((), (0, 0, 0)):
      c.eval.tree = off
      settings.validate(c)
      self.assertIsNone(settings.eval_tree(c))
    c.eval.tree = (8, 4, 2)
    settings.validate(c)
    self.assertEqual(settings.eval_tree(c), tree.TreeShape(8, 4, 2))
    for bad, message in (((8, 4), "expected"), ((8, 0, 2), "depth must be >= 1"),
                         ((40, 2, 2), "exceeds the 6 candidates"), ((8, -4, 2), ">= 0")):
      c.eval.tree = bad
      with self.assertRaisesRegex(UserError, r"config\.eval\.tree=.*" + message):
        settings.validate(c)


class ViewsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.enterContext(jax.numpy_rank_promotion("raise"))

  def test_views_take_every_value_from_the_config(self):
    c = cli.load_config(SMOKE)
    p = settings.ppow(c, 0.25)
    self.assertEqual((p.window, p.group_size, p.ppo_epochs, p.gamma), (3, 2, 1, 0.25))
    self.assertEqual(settings.baseline(c).ttt_steps, c.baseline.ttt_steps)
    c.baseline.ttt_from_step = 7
    self.assertEqual(settings.baseline(c).ttt_from_step, 7)
    self.assertEqual(settings.baseline(c, warm_start=False).ttt_from_step, 0)  # continued stages
    self.assertEqual(dataclasses.asdict(settings.optim(c.ppow.optim)), c.ppow.optim.to_dict())

  def test_views_have_no_defaults_of_their_own(self):
    for cls in (rollout.PPOWConfig, train_step.BaselineConfig, train_step.OptimConfig):
      for f in dataclasses.fields(cls):
        self.assertIs(f.default, dataclasses.MISSING, f"{cls.__name__}.{f.name}")

  def test_a_field_missing_from_the_config_is_loud(self):
    c = cli.load_config(SMOKE)
    with self.assertRaisesRegex(KeyError, "PPOWConfig.window"):
      settings.view(rollout.PPOWConfig, c.baseline, gamma=0.1)
    with self.assertRaisesRegex(KeyError, "total_reward's knob use_speed"):
      settings.knobs(rewards.total_reward, c.baseline)

  def test_the_reward_reads_its_knobs_by_name(self):
    c = cli.load_config(SMOKE)
    c.ppow.prox_eta = 0.75
    reward = settings.ppow(c, 0.25).reward
    self.assertEqual(reward["prox_eta"], 0.75)
    self.assertEqual(set(reward), set(settings.knob_names(rewards.total_reward)))
    self.assertLessEqual({"use_speed", "use_prox", "speed_form", "prox_form", "lambda_prox",
                          "prox_eta", "prox_eps"}, set(reward))
    self.assertNotIn("gamma", reward)  # measured or configured: passed on its own
    self.assertNotIn("delta_N", reward)  # a keyword with a default is an input, not a knob


class ArchitecturesTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.enterContext(jax.numpy_rank_promotion("raise"))

  def test_lm_drafter_from_preset_or_from_the_target(self):
    c = cli.load_config(os.path.join(ROOT, "configs", "llama31_8b_eagle3.py:runlocal"))
    target = settings.target_arch(c)
    self.assertEqual(target.hidden_size, 64)  # the tiny preset
    c.drafter.kind = "lm"
    derived = settings.drafter_arch(c, target)
    self.assertEqual((derived.hidden_size, derived.num_layers, derived.num_heads), (32, 1, 4))
    c.drafter.preset = "tiny"
    self.assertEqual(settings.drafter_arch(c, target).hidden_size, 64)
    c.drafter.preset = "qwen3-0.6b"
    with self.assertRaisesRegex(UserError, "drafter.preset='qwen3-0.6b' has vocab_size 151936"):
      settings.drafter_arch(c, target)

  def test_eagle3_sizes(self):
    c = cli.load_config(SMOKE)
    target = settings.target_arch(c, vocab_size=300)
    d = settings.drafter_arch(c, target)
    self.assertEqual((d.hidden_size, d.draft_vocab_size), (32, 300))
    c.drafter.intermediate_size, c.drafter.draft_vocab_size = 48, 100
    d = settings.drafter_arch(c, target)
    self.assertEqual((d.intermediate_size, d.draft_vocab_size), (48, 100))
    self.assertEqual(d.aux_layer_ids, target.eagle3_layers())
    c.drafter.aux_layers = (0, 1, target.num_layers)  # the last layer's output is allowed
    self.assertEqual(settings.drafter_arch(c, target).aux_layer_ids, (0, 1, target.num_layers))
    for bad in [(0, 1), (0, 1, target.num_layers + 1)]:
      c.drafter.aux_layers = bad
      with self.assertRaisesRegex(UserError, "config.drafter.aux_layers"):
        settings.drafter_arch(c, target)


class StagesTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.enterContext(jax.numpy_rank_promotion("raise"))

  def test_chosen_in_table_order_and_unknown_named(self):
    c = cli.load_config(SMOKE)
    c.stages = "eval, ppow"
    self.assertEqual(stages.chosen(c), ("ppow", "eval"))
    c.stages = "ppow,pow"
    with self.assertRaisesRegex(UserError, "config.stages: unknown stage 'pow'"):
      stages.chosen(c)

  def test_settings_include_those_of_the_stages_started_from(self):
    c = cli.load_config(SMOKE)
    ppow = stages.settings(c, "ppow")
    self.assertEqual(ppow["ppow.window"], 3)
    self.assertIn("baseline.ttt_steps", ppow)  # PPOW starts from the baseline
    self.assertIn("target.hidden_size", ppow)  # which starts from the target
    self.assertNotIn("eval.window", ppow)
    continued = stages.settings(c, "continued")
    self.assertIn("ppow.steps", continued)
    self.assertNotIn("ppow.window", continued)
    self.assertEqual(stages.differences(ppow, stages.settings(c, "ppow")), [])
    c.ppow.window = 4
    self.assertEqual(stages.differences(ppow, stages.settings(c, "ppow")),
                     ["ppow.window (3 -> 4)"])

  def test_continued_budget_matches_ppow(self):
    c = cli.load_config(SMOKE, [("ppow.ppo_epochs", "3"), ("baseline.batch_size", "5")])
    steps, batch, _, updates = stages.BY_NAME["continued"].schedule(c)
    self.assertEqual((steps, batch, updates), (c.ppow.steps, c.ppow.batch_size, 3))
    # the same seed offset: the control reads PPOW's sequences in PPOW's order
    self.assertEqual(stages.BY_NAME["continued"].seed_offset, stages.BY_NAME["ppow"].seed_offset)


if __name__ == "__main__":
  absltest.main()
