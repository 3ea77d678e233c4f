"""tfcdisc: e-commerce product classification from images, on TensorFlow and Keras 3."""
