"""tf.distribute for the TensorFlow backend: the strategy by name and each
worker's shard. Imported only when the backend is TensorFlow (JAX runs use
``keras.distribution``; see ``keras_resnet.training.make_strategy``).
"""

import tensorflow as tf


def worker_shard(strategy):
    """(workers, this worker's index) under a multi-worker strategy, else None."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return None
    spec = resolver.cluster_spec()
    jobs = [j for j in ("chief", "worker") if j in spec.jobs]
    count = sum(spec.num_tasks(j) for j in jobs)
    if count < 2:
        return None
    chief_first = "chief" in spec.jobs and resolver.task_type == "worker"
    return count, (resolver.task_id or 0) + chief_first



class KerasMultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """MultiWorkerMirroredStrategy that accepts the reductions Keras 3 asks of it.

    Keras 3's TF trainer (checked on 3.15) reduces a nested (x, y) batch at the
    start of ``fit`` and asks for ``reduce(MEAN, scalar, axis=0)`` on each
    step's metrics; the stock strategy rejects both. Reducing leaf by leaf,
    with no axis for scalars, is what Keras means.
    """

    def reduce(self, reduce_op, value, axis):
        def leaf(v):
            first = self.experimental_local_results(v)[0]
            rank = getattr(first, "shape", tf.TensorShape([])).rank
            return super(KerasMultiWorkerStrategy, self).reduce(
                reduce_op, v, axis if rank else None)

        return tf.nest.map_structure(leaf, value)


def make_strategy(name):
    """tf.distribute strategy by name: one device, the GPUs of one machine, or workers."""
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":  # the cluster comes from TF_CONFIG
        return KerasMultiWorkerStrategy()
    return tf.distribute.get_strategy()
