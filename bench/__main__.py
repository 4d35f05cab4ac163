"""python -m bench COMMAND [options]: measure this system (COMMAND --help for its options).

commands:
  compare    the 2017 table: this system, Serve's no-op floor, the 2017 architecture and a tuned
             single process, side by side (docs/BENCHMARKS.md)
  serving    Serve variants of this system: ingress, batching, replicas (docs/SERVING_BENCH.md)
  freshness  time from feedback to answers that use it (docs/FRESHNESS_BENCH.md)
  drift      an English base learns Korean from feedback online; English must not drop (docs/DRIFT.md)
  features   word against word + character n-gram features, by seed (docs/FEATURES.md)
  quality    model families and training recipes, by seed, on clean and perturbed test sets (docs/QUALITY.md)
  model_cost CPU per text of one model call, by family and features (docs/MODEL_COST.md)
  replay_rounds  the learner's rounds replayed offline on a store's version: Korean and English
             accuracy per follow-up policy, no Serve, no gate (docs/ONLINE_LEARNING.md)
  cpu_split  where the machine's CPU goes under load, per process (docs/BENCHMARKS.md)
  profile    py-spy profile of a replica under load: where a request's time goes (docs/SERVING.md)
"""

import sys

COMMANDS = {"compare": "bench.compare", "serving": "bench.serving", "freshness": "bench.freshness",
            "profile": "bench.profile", "drift": "bench.drift",
            "features": "bench.features", "quality": "bench.quality", "model_cost": "bench.model_cost",
            "replay_rounds": "bench.replay_rounds", "cpu_split": "bench.cpu_split"}


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    module = __import__(COMMANDS[argv[0]], fromlist=["main"])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
