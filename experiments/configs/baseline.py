r"""Family `baseline`: one model trained with one chosen loss.

Arguments (after the colon): dataset (digits | cifar10 | cifar100 | cifar10_n | cifar100_n |
npz:PATH | tfds:NAME), imbalance (n_max/n_min, >= 1), profile (exp | step), noise (none | sym |
unif | asym | flip | imb | real), noise_rate, loss (ce | la | balanced_softmax | ldam_drw | gce |
sce | elr), model (empty: the preset's), preset (paper | cpu | smoke), seed.

Offline default (about 15 s on 2 CPU cores):
  python experiments/main.py --config=experiments/configs/baseline.py --workdir=runs/baseline
  Expected: digits, ratio 10, sym noise 0.2, CE with an MLP, 100 epochs: 90.4% test accuracy
  (few-shot 70.5%); with `:loss=la` 91.3% (few-shot 82.9%).

CIFAR-10-LT ratio 100 from the shared npz, logit adjustment, the `cpu` preset (ResNet-8, 8
epochs; 7.4-8.5 min measured with a second job sharing the 2 cores):
  python experiments/main.py \
    --config=experiments/configs/baseline.py:dataset=npz:../shared/data/cifar10.npz,imbalance=100,noise=none,loss=la \
    --config.data.many_shot_threshold=1500 --config.data.few_shot_threshold=200 \
    --workdir=runs/c10_la
  Expected (measured): LA 48.3% overall, few-shot 45.8%; with `loss=ce` 35.3%, few-shot 0.0%.
"""

from dsink_jax import pipelines


def get_config(arg=None):
    return pipelines.get_config("baseline", arg)
