import pytest

from flexgen_core import Policy


def test_defaults_put_everything_on_the_compute_device():
    p = Policy()
    assert p.percent == (100, 0, 100, 0, 100, 0)
    assert (p.gpu_batch_size, p.num_gpu_batches, p.overlap, p.cpu_cache_compute) == (1, 1, True, False)
    assert Policy(w_gpu_percent=0, w_cpu_percent=0).w_disk_percent == 100


@pytest.mark.parametrize("kwargs, field", [
    (dict(w_gpu_percent=60, w_cpu_percent=50), "w_gpu_percent + Policy.w_cpu_percent = 110"),
    (dict(cache_gpu_percent=-1), "cache_gpu_percent"),
    (dict(act_cpu_percent=101, act_gpu_percent=0), "act_cpu_percent"),
    (dict(gpu_batch_size=0), "gpu_batch_size"),
    (dict(num_gpu_batches=-2), "num_gpu_batches"),
    (dict(w_gpu_percent=50.5), "w_gpu_percent"),
    (dict(overlap="yes"), "overlap"),
])
def test_invalid_policies_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("+", r"\+")):
        Policy(**kwargs)


def test_percent_round_trip_and_unknown_fields():
    p = Policy.from_percent([20, 80, 0, 100, 0, 100], gpu_batch_size=48, num_gpu_batches=3)
    assert p.percent == (20, 80, 0, 100, 0, 100) and p.block_size == 144
    assert Policy.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="gpu_batch"):
        Policy.from_dict({"gpu_batch": 2})
    with pytest.raises(ValueError, match="6 numbers"):
        Policy.from_percent([1, 2, 3])
