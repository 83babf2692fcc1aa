r"""Family `dsink`: CE baseline, imbalance-robust f_L, noise-robust f_N, then the D-SINK student.

Arguments (after the colon): those of `baseline.py` (dataset, imbalance, profile, noise,
noise_rate, loss = the baseline stage's loss, model, preset, seed) plus alpha (D-SINK weight,
default 2), epsilon (default 2, the paper's), allocation (online | dataset | batch, default
online), class_mass_prior (label_prior | none), student_logit_adjustment (default 1),
class_mass (batch | global, batch allocation only), imbalance_loss (default la), noise_loss
(default auto: CE up to 30 epochs, else GCE), base_loss, init_from, num_iters (Sinkhorn
iterations, default 50), teachers (cached | forward, default cached: the frozen teachers'
outputs computed once per stage and looked up by index). The defaults marked "ours" in
docs/method.md were chosen from the measurements in the README.

Offline default, the README's main job (about 35-60 s on 2 CPU cores):
  python experiments/main.py --config=experiments/configs/dsink.py --workdir=runs/dsink_digits
  Prints the table (digits, ratio 10, sym noise 0.2; 4 stages of an MLP, 100 epochs each, f_N is
  GCE at 100 epochs). Measured (seed 0): CE 90.4, f_L (LA) 90.7, f_N (GCE) 80.9, student 92.7 %
  test accuracy (few-shot: 70.5, 81.8, 16.3, 82.9).

CIFAR-10-LT ratio 100, sym noise 0.4, `cpu` preset (3 stages: f_N is the CE stage at 30 epochs;
10-25 minutes a stage on 2 cores, depending on load):
  python experiments/main.py \
    --config=experiments/configs/dsink.py:dataset=npz:../shared/data/cifar10.npz,imbalance=100,noise=sym,noise_rate=0.4 \
    --workdir=runs/c10_r100_sym40

Sweeps of the student (one vmapped program): experiments/sweep.py with this same config.
"""

from dsink_jax import pipelines


def get_config(arg=None):
    return pipelines.get_config("dsink", arg)
