# The model image the init container copies from: the model repository on a busybox base (for `sh`
# and `cp`), nothing else. The server image stays model-free; a new model is a new tag of this image.
#   docker build -f deploy/k8s/models.Dockerfile -t hydra-serve-models:digits-1 .
FROM busybox:1.37
COPY models/ /models/
USER 10001:10001
