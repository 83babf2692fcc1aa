r"""Family `ot_softmax`: OT-dynamic softmax + SupCon, against CE, LA and Balanced Softmax.

Arguments (after the colon): those of `baseline.py` (dataset, imbalance, profile, noise (default
none), noise_rate, model, preset, seed) plus inference (raw | balanced) and train_target (prior |
uniform: the cell masses the heights are solved for during training).

Offline (about a minute on 2 CPU cores):
  python experiments/main.py --config=experiments/configs/ot_softmax.py --workdir=runs/ots_digits
CIFAR-10-LT ratio 100, clean labels, `cpu` preset:
  python experiments/main.py \
    --config=experiments/configs/ot_softmax.py:dataset=npz:../shared/data/cifar10.npz,imbalance=100 \
    --workdir=runs/ots_c10_r100
Expected: a table of CE, LA, Balanced Softmax and OT-softmax (see README for measured figures).
"""

from dsink_jax import pipelines


def get_config(arg=None):
    return pipelines.get_config("ot_softmax", arg)
