r"""Family `baseline`: one model trained with one chosen loss.

Arguments (after the colon): dataset (digits | cifar10 | cifar100 | cifar10_n | cifar100_n |
npz:PATH | tfds:NAME), imbalance (n_max/n_min, >= 1), profile (exp | step), noise (none | sym |
unif | asym | flip | imb | real), noise_rate, loss (ce | la | balanced_softmax | ldam_drw | gce |
sce | elr), model (empty: the preset's), preset (paper | cpu | smoke), seed.

Offline default (about a minute on 2 CPU cores):
  python experiments/main.py --config=experiments/configs/baseline.py --workdir=/tmp/baseline
  Expected: digits, ratio 10, sym noise 0.2, CE with an MLP: about 85-90% test accuracy.

CIFAR-10-LT ratio 100 from the shared npz, logit adjustment, the `cpu` preset (~5 min):
  python experiments/main.py \
    --config=experiments/configs/baseline.py:dataset=npz:../shared/data/cifar10.npz,imbalance=100,noise=none,loss=la \
    --workdir=/tmp/c10_la
  Expected: LA beats CE on few-shot accuracy (see README for the measured table).
"""

from dsink_jax import configs


def get_config(arg=None):
    args = configs.parse_arg_string(arg, configs.COMMON_ARGS)
    return configs.build_config("baseline", args)
