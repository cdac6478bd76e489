"""Specification of the examples' shared machinery (examples/common): data order, sharding,
checkpoints, metrics, augmentation, report."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import examples_support  # noqa: F401  (puts examples/ on sys.path)
import ec2t_jax as ec2t
from common import augment, checkpoint, data, metrics, parallel, report, training
from common.cli import UserError
from ec2t_jax import models


def _shard(index, n, offset=0):
  labels = np.arange(offset, offset + n, dtype=np.int32)
  images = np.broadcast_to(labels[:, None, None, None].astype(np.uint8), (n, 2, 2, 1)).copy()
  return data.Shard(index, images, labels)


# --------------------------------------------------------------------------- data order

def test_each_process_reads_a_contiguous_block_of_shards():
  assert list(data.shards_of_process(8, process_index=3, process_count=4)) == [6, 7]


def test_shards_must_divide_among_processes():
  with pytest.raises(UserError, match="multiple of the number of processes"):
    data.shards_of_process(3, process_index=0, process_count=2)


def test_a_training_batch_depends_only_on_its_step():
  shards = [_shard(0, 20)]
  first = data.TrainBatches(shards, per_shard_batch=4, steps_per_epoch=5, seed=1)
  second = data.TrainBatches(shards, per_shard_batch=4, steps_per_epoch=5, seed=1)
  for step in (7, 3, 12):
    np.testing.assert_array_equal(first.batch(step)["label"], second.batch(step)["label"])


def test_an_epoch_visits_every_example_once_and_epochs_differ():
  batches = data.TrainBatches([_shard(0, 20)], per_shard_batch=4, steps_per_epoch=5, seed=1)
  epoch0 = np.concatenate([batches.batch(s)["label"] for s in range(5)])
  epoch1 = np.concatenate([batches.batch(s)["label"] for s in range(5, 10)])
  assert sorted(epoch0) == list(range(20))
  assert not np.array_equal(epoch0, epoch1)


def test_global_batches_do_not_depend_on_how_many_processes_read_the_shards():
  shards = [_shard(0, 12), _shard(1, 12, offset=100)]
  one_process = data.TrainBatches(shards, 3, steps_per_epoch=4, seed=0)
  per_process = [data.TrainBatches([s], 3, steps_per_epoch=4, seed=0) for s in shards]
  for step in range(8):
    joined = np.concatenate([p.batch(step)["label"] for p in per_process])
    np.testing.assert_array_equal(one_process.batch(step)["label"], joined)


def test_eval_batches_cover_every_example_once_and_mask_the_padding():
  shards = [_shard(0, 5), _shard(1, 3, offset=10)]
  batches = list(data.eval_batches(shards, per_shard_batch=2, num_batches=3))
  seen = np.concatenate([b["label"][b["mask"] == 1] for b in batches])
  assert sorted(seen) == [0, 1, 2, 3, 4, 10, 11, 12]
  assert all(b["image"].shape == (4, 2, 2, 1) for b in batches)


def test_unknown_dataset_names_the_known_ones():
  with pytest.raises(UserError, match="unknown dataset 'imagenet'.*cifar10"):
    data.dataset_spec("imagenet")


def test_batch_size_must_split_evenly_over_shards():
  with pytest.raises(UserError, match="multiple of --data_shards=3"):
    data.per_shard_batch_size(128, 3)


def test_missing_dataset_without_download_is_a_clear_error(tmp_path):
  with pytest.raises(UserError, match="not in .* downloading is off"):
    data.load_shards("mnist", "test", [0], 1, data_dir=str(tmp_path), download=False)


@examples_support.needs_mnist
def test_mnist_loads_offline_in_even_shards():
  shards = data.load_shards("mnist", "test[:2000]", [0, 1], 2,
                            data_dir=str(examples_support.MNIST_DATA_DIR), download=False)
  assert [len(s) for s in shards] == [1000, 1000]
  assert shards[0].images.dtype == np.uint8 and shards[0].images.shape[1:] == (28, 28, 1)


# --------------------------------------------------------------------------- sharding

def test_fsdp_spec_shards_the_largest_divisible_dimension():
  assert parallel.fsdp_spec((3, 3, 16, 64), 4) == jax.sharding.PartitionSpec(None, None, None,
                                                                             "fsdp")
  assert parallel.fsdp_spec((400, 120), 8) == jax.sharding.PartitionSpec("fsdp", None)


def test_fsdp_spec_replicates_small_or_indivisible_arrays():
  assert parallel.fsdp_spec((64,), 4) == jax.sharding.PartitionSpec()
  assert parallel.fsdp_spec((3, 3, 5, 7 * 49), 4) == jax.sharding.PartitionSpec()
  assert parallel.fsdp_spec((400, 120), 1) == jax.sharding.PartitionSpec()


@examples_support.needs_8_devices
def test_fsdp_state_shardings_split_latent_weights_and_adam_moments():
  mesh = parallel.make_mesh(fsdp=4)
  params = {"a": {"kernel": jnp.zeros((3, 3, 16, 32))}, "b": {"kernel": jnp.zeros((3, 3, 32, 32))},
            "c": {"kernel": jnp.zeros((32, 10))}}
  tx = ec2t.reference_optimizer(gamma=0.1)
  state = jax.eval_shape(lambda: training.TrainState.create(params, {}, tx, seed=0))
  shardings = parallel.state_shardings(state, mesh)
  ternary = ec2t.find_quantizer_state(shardings.opt_state)
  assert ternary.latent["b"]["kernel"].spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
  assert shardings.params["b"]["kernel"].spec == jax.sharding.PartitionSpec(None, None, None,
                                                                            "fsdp")
  assert shardings.step.spec == jax.sharding.PartitionSpec()


@examples_support.needs_8_devices
def test_global_batch_is_split_over_all_devices():
  mesh = parallel.make_mesh(fsdp=2)
  batch = parallel.global_batch({"x": np.arange(16.0)}, parallel.batch_sharding(mesh))
  assert len(batch["x"].addressable_shards) == 8
  chex.assert_shape(batch["x"].addressable_shards[0].data, (2,))


def test_mesh_rejects_an_fsdp_size_that_does_not_divide_the_devices():
  with pytest.raises(UserError, match="must divide"):
    parallel.make_mesh(fsdp=jax.device_count() + 1)


# --------------------------------------------------------------------------- checkpoints

def _ec2t_state():
  model = models.LeNet300100(hidden_features=(16, 8))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  tx = ec2t.reference_optimizer(gamma=0.2)
  create = jax.jit(lambda p: training.TrainState.create(p, {}, tx, seed=3,
                                                        prepare_params=ec2t.quantized_params))
  return create(params), tx


def _abstract(state):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


def test_checkpoint_round_trips_the_whole_ec2t_state_bitwise(tmp_path):
  state, _ = _ec2t_state()
  ckpts = checkpoint.PhaseCheckpoints(tmp_path, {"model": "m"})
  ckpts.save("latest", 5, state, {"epoch": 1, "step_in_epoch": 2})
  restored, meta = ckpts.restore("latest", _abstract(state))
  chex.assert_trees_all_equal(restored, state)
  assert isinstance(ec2t.find_quantizer_state(restored.opt_state), ec2t.QuantizerState)
  assert (meta["epoch"], meta["step_in_epoch"], meta["step"]) == (1, 2, 5)


def test_checkpoints_accept_a_relative_folder(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  state, _ = _ec2t_state()
  checkpoint.PhaseCheckpoints("runs/x", {"model": "m"}).save("latest", 1, state, {})
  assert checkpoint.PhaseCheckpoints("runs/x", {"model": "m"}).step("latest") == 1


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited")
def test_an_interrupted_save_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
  state, _ = _ec2t_state()
  ckpts = checkpoint.PhaseCheckpoints(tmp_path, {"model": "m"}, keep_latest=1)
  ckpts.save("latest", 1, state, {})

  def crash(*args, **kwargs):
    raise KeyboardInterrupt("killed while writing")

  import orbax.checkpoint as ocp
  later = state._replace(step=state.step + 1)
  with monkeypatch.context() as patch:  # dies after orbax created the temporary folder
    patch.setattr(ocp.handlers.StandardCheckpointHandler, "async_save", crash)
    with pytest.raises(KeyboardInterrupt):
      ckpts.save("latest", 2, later, {})
  assert any("tmp" in name for name in os.listdir(tmp_path / "latest"))
  reopened = checkpoint.PhaseCheckpoints(tmp_path, {"model": "m"}, keep_latest=1)
  assert reopened.step("latest") == 1
  restored, _ = reopened.restore("latest", _abstract(state))
  chex.assert_trees_all_equal(restored, state)


def test_restoring_another_models_checkpoint_names_the_difference(tmp_path):
  state, _ = _ec2t_state()
  checkpoint.PhaseCheckpoints(tmp_path, {"model": "lenet5"}).save("latest", 1, state, {})
  with pytest.raises(UserError, match="incompatible.*model: checkpoint 'lenet5' vs this run "
                                      "'lenet300100'"):
    checkpoint.PhaseCheckpoints(tmp_path, {"model": "lenet300100"}).restore(
        "latest", _abstract(state))


def test_restoring_into_a_different_structure_is_a_clear_error(tmp_path):
  state, _ = _ec2t_state()
  checkpoint.PhaseCheckpoints(tmp_path, {"model": "m"}).save("latest", 1, state, {})
  other = state._replace(params=jax.tree.map(lambda x: jnp.zeros(x.shape + (2,)), state.params))
  with pytest.raises(UserError, match="cannot restore checkpoint .*does not match this model"):
    checkpoint.PhaseCheckpoints(tmp_path, {"model": "m"}).restore("latest", _abstract(other))


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path):
  state, _ = _ec2t_state()
  checkpoint.PhaseCheckpoints(tmp_path, {"model": "m"}).save("latest", 1, state, {})
  for root, _, files in os.walk(tmp_path / "latest" / "1" / "state"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage")
  with pytest.raises(UserError, match="cannot restore checkpoint"):
    checkpoint.PhaseCheckpoints(tmp_path, {"model": "m"}).restore("latest", _abstract(state))


def test_read_state_needs_no_model(tmp_path):
  state, _ = _ec2t_state()
  checkpoint.PhaseCheckpoints(tmp_path, {"model": "m"}).save("best", 4, state, {})
  params, batch_stats = checkpoint.restore_variables(tmp_path)
  chex.assert_trees_all_equal(params, state.params)
  assert batch_stats == {}


# --------------------------------------------------------------------------- metrics

def test_metrics_go_to_json_lines_and_tensorboard(tmp_path):
  writer = metrics.MetricWriter(tmp_path)
  writer.write({"phase": "ec2t_phase1", "epoch": 1, "step": 10, "val_accuracy": 0.5,
                "layer_sparsity": {"fc2/kernel": 0.9}})
  writer.close()
  records = metrics.read_jsonl(tmp_path / "metrics.jsonl")
  assert records == [{"epoch": 1, "layer_sparsity": {"fc2/kernel": 0.9},
                      "phase": "ec2t_phase1", "step": 10, "val_accuracy": 0.5}]
  import tensorflow as tf  # reads the event files independently of tensorboardX
  (event_file,) = (tmp_path / "tensorboard").iterdir()
  tags = {value.tag: value.simple_value
          for event in tf.compat.v1.train.summary_iterator(str(event_file))
          for value in event.summary.value}
  assert tags == pytest.approx({"ec2t_phase1/val_accuracy": 0.5,
                                "ec2t_phase1/layer_sparsity/fc2/kernel": 0.9})


def test_disabled_writer_writes_nothing(tmp_path):
  metrics.MetricWriter(tmp_path / "out", enabled=False).write({"step": 1, "x": 1.0})
  assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- augmentation, report

def test_flip_and_crop_moves_pixels_but_keeps_shape_and_is_deterministic():
  images = jax.random.uniform(jax.random.key(0), (8, 32, 32, 3))
  first = augment.random_flip_and_crop(images, jax.random.key(1))
  again = augment.random_flip_and_crop(images, jax.random.key(1))
  chex.assert_shape(first, images.shape)
  chex.assert_trees_all_equal(first, again)
  assert not np.allclose(first, images)


def test_shift_only_augmentation_moves_a_pixel_by_at_most_the_padding_and_never_mirrors():
  images = jnp.zeros((64, 28, 28, 1)).at[:, 5, 3, 0].set(1.0)  # a dot near the left edge
  out = np.asarray(augment.random_flip_and_crop(images, jax.random.key(2), 2, flip=False))
  positions = [np.argwhere(o[..., 0] > 0) for o in out]
  assert all(len(p) <= 1 for p in positions)  # the dot stays a dot (or is cropped away)
  moved = np.array([p[0] for p in positions if len(p)])
  assert np.all(np.abs(moved - [5, 3]) <= 2)  # a mirror would put it near column 24
  assert len({tuple(m) for m in moved}) > 5  # shifts vary across the batch


def test_mnist_augmentation_shifts_by_two_without_flips():
  spec = data.dataset_spec("mnist")
  assert (spec.flip, spec.crop_padding) == (False, 2)
  assert data.dataset_spec("cifar10").flip


def test_prepare_images_standardises_per_channel():
  images = jnp.full((1, 2, 2, 2), 255, jnp.uint8)
  out = augment.prepare_images(images, mean=(0.5, 1.0), std=(0.5, 1.0))
  np.testing.assert_allclose(out[0, 0, 0], [1.0, 0.0])


def test_model_sizes_count_ternary_layers_at_two_bits_or_their_entropy():
  sizes = report.model_sizes(total_params=1000, layers=[(800, 1.0)])
  assert sizes["float32_bits"] == 32_000
  assert sizes["packed_bits"] == 200 * 32 + 800 * 2 + 32
  assert sizes["entropy_bits"] == 200 * 32 + 800 + 32


def test_train_step_lands_ec2t_params_on_three_values():
  state, tx = _ec2t_state()
  spec = data.dataset_spec("mnist")
  step = jax.jit(training.make_train_step(models.LeNet300100(hidden_features=(16, 8)), tx, spec,
                                          augment=False))
  batch = {"image": jnp.ones((4, 28, 28, 1), jnp.uint8), "label": jnp.arange(4)}
  state, out = step(state, batch)
  assert int(state.step) == 1 and np.isfinite(out["loss"])
  assert np.unique(state.params["fc2"]["kernel"]).size <= 3
