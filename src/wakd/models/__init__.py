"""Models: backbones, NetVLAD, PCA whitening, the place network and its weights."""

from wakd.models.backbones import BACKBONES, Backbone, build_backbone, imagenet_cache_file
from wakd.models.checkpoints import load_place_net_weights, read_state_dict
from wakd.models.clustering import (
    kmeans_centroids,
    sample_local_features,
    write_centroid_file,
)
from wakd.models.netvlad import NetVLAD
from wakd.models.pca import PCAWhitening
from wakd.models.place_net import PlaceNet, PlaceOutput, build_place_net

__all__ = [
    "BACKBONES",
    "Backbone",
    "NetVLAD",
    "PCAWhitening",
    "PlaceNet",
    "PlaceOutput",
    "build_backbone",
    "build_place_net",
    "imagenet_cache_file",
    "kmeans_centroids",
    "load_place_net_weights",
    "read_state_dict",
    "sample_local_features",
    "write_centroid_file",
]
