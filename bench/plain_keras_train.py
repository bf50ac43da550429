"""The baseline for bench/train.py: what a person would write by hand with plain Keras.

``image_dataset_from_directory`` (with the tutorial's ``cache().prefetch()``), a frozen
MobileNetV2 (alpha 0.35, 224x224, the same network and weights as the Teachable Machine base;
the weights file is written by bench/train.py), a new Dropout + Dense softmax head, and
``model.fit``. ``--fine-tune`` unfreezes the whole base instead (BatchNorm kept in inference
mode by calling the base with ``training=False``).

Prints one JSON object: fit seconds, images/s of the training part of each epoch, the
validation accuracy of the last epoch and the accuracy on the test folder.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="folder of class folders")
    parser.add_argument("--test", required=True, help="folder of class folders")
    parser.add_argument("--weights", required=True, help="MobileNetV2 alpha 0.35 .weights.h5")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--val-split", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--fine-tune", action="store_true", help="train the whole base too")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(args.seed)
    train_ds, val_ds = keras.utils.image_dataset_from_directory(
        args.train,
        validation_split=args.val_split,
        subset="both",
        seed=args.seed,
        image_size=(224, 224),
        batch_size=args.batch_size,
    )
    test_ds = keras.utils.image_dataset_from_directory(
        args.test, image_size=(224, 224), batch_size=args.batch_size, shuffle=False
    )
    num_classes = len(train_ds.class_names)
    autotune = tf.data.AUTOTUNE
    train_ds = train_ds.cache().prefetch(autotune)
    val_ds = val_ds.cache().prefetch(autotune)

    base = keras.applications.MobileNetV2(
        alpha=0.35, include_top=False, weights=None, input_shape=(224, 224, 3), pooling="avg"
    )
    base.load_weights(args.weights)
    base.trainable = args.fine_tune
    inputs = keras.Input((224, 224, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)  # MobileNetV2: [-1, 1]
    x = base(x, training=False)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(args.lr),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )

    class Speed(keras.callbacks.Callback):
        """Images/s of each epoch's training part (validation excluded), like the project's."""

        def __init__(self) -> None:
            super().__init__()
            self.rates: list[float] = []
            self.images = 0

        def on_epoch_begin(self, epoch, logs=None):
            self.start = self.end = time.perf_counter()
            self.images = 0

        def on_train_batch_end(self, batch, logs=None):
            self.end = time.perf_counter()
            self.images = (batch + 1) * args.batch_size

        def on_epoch_end(self, epoch, logs=None):
            n = min(self.images, self.total)
            self.rates.append(n / max(self.end - self.start, 1e-9))

    speed = Speed()
    speed.total = sum(int(b[1].shape[0]) for b in train_ds)
    start = time.perf_counter()
    history = model.fit(
        train_ds, validation_data=val_ds, epochs=args.epochs, callbacks=[speed], verbose=0
    )
    fit_seconds = time.perf_counter() - start
    _, test_accuracy = model.evaluate(test_ds, verbose=0)
    print(
        json.dumps(
            {
                "fit_seconds": round(fit_seconds, 2),
                "images_per_second": [round(r, 1) for r in speed.rates],
                "val_accuracy": history.history["val_accuracy"][-1],
                "test_accuracy": float(test_accuracy),
                "train_images": speed.total,
            }
        )
    )


if __name__ == "__main__":
    main()
