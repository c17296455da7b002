"""Input pipelines (see `pipeline`): grain over random-access sources, with numpy augmentation.

Nothing here imports TensorFlow: TFDS datasets are read from ArrayRecord files through
`tfds.data_source`, which needs TensorFlow only to build a dataset, never to read one.
"""
