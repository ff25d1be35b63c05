r"""What does a synthetic pretrained tower lose, level by level? A linear probe (issue 35).

  python -m bench.attribute_probe --config ot_world.py [--n_train=2000 --n_test=1000 --seed=N]
  python -m bench.attribute_probe --config ot_world.py --config.model.vision.synth.steps=1500

Takes the config's synthetic vision tower (`model.vision.pretrained_dir = "synth:NAME"`,
remote_jax/towers.py; pretrained first if its cache has none), draws fresh crops of the
world's shapes in one random colour each (seeded, apart from the pretraining crops), and
fits a ridge classifier per level of the tower on an object's tokens (flattened) for the
attribute the tower should lose (colour, chance 1/5) and the one it keeps (shape, 1/3).
Prints one JSON object: the tower, test accuracy per level, chance, and issue 35's goal
(the lost attribute decodable >= 90% at some low level, within 10 points of chance at the
top). `--config.model.vision.synth.FIELD=VALUE` probes another recipe (its own cache entry).
"""
import json
import sys

from absl import flags

from remote_jax import cli


def main(argv):
  del argv
  from remote_jax import errors, towers, writers
  from remote_jax.models import convert
  writers.setup_cli_logging()
  config = _CONFIG.value
  vision = config.model.vision
  with errors.user_errors():
    path = towers.ensure_tower(vision.pretrained_dir, vision, config.data.cache_dir)
  cfg, params = convert.load_clip_vision(path, use_cls=False)
  probe = towers.probe_levels(params, cfg, vision.synth["world_size"],
                              vision.synth["pixel_noise"], seed=_SEED.value,
                              n_train=_N_TRAIN.value, n_test=_N_TEST.value)
  lost = towers.TASKS[vision.pretrained_dir.removeprefix(towers.SCHEME)]["lose"]
  accs = [r[lost] for r in probe["levels"]]
  chance = probe["chance"][lost]
  json.dump({"tower": str(path), "attribute": lost, "recipe": writers.jsonable(vision.synth), **probe,
             "goal": {"low_max": max(accs[:-1]), "top": accs[-1], "chance": chance,
                      "met": max(accs[:-1]) >= 0.9 and accs[-1] <= chance + 0.1}},
            sys.stdout)
  print()


if __name__ == "__main__":
  # Flags only when run: the tests import this module beside other CLIs' flags.
  from remote_jax import towers as _towers
  _CONFIG = cli.define_config_flag()
  _SEED = flags.DEFINE_integer("seed", _towers.PROBE["seed"], "Seed of the probe's crops.")
  _N_TRAIN = flags.DEFINE_integer("n_train", _towers.PROBE["n_train"], "Probe training crops.")
  _N_TEST = flags.DEFINE_integer("n_test", _towers.PROBE["n_test"], "Probe test crops.")
  cli.run(main)
