# The image every node of the wsseg Ray cluster runs (cluster.yaml `docker.image`).
#
#   docker build -t wsseg:0.1.0 .
#   docker tag wsseg:0.1.0 <account>.dkr.ecr.<region>.amazonaws.com/wsseg:0.1.0 && docker push ...
#
# Base: the official Ray image for the exact Ray we pin (requirements.txt: ray==2.60.0), Python 3.11,
# CUDA userspace, `ray` CLI and the autoscaler's cloud SDKs (boto3) included. `rayproject/ray-ml`
# is no longer published, so the ML stack is installed here from our own pins.
# tests/test_deploy.py checks that this tag's Ray version equals the pin.
FROM rayproject/ray:2.60.0-py311-gpu

# The base image's user is `ray` (uid 1000, gid 100 "users"), home /home/ray, Python in
# /home/ray/anaconda3 owned by that user: pip installs need no root.
USER ray
WORKDIR /home/ray/wsseg
# cluster.yaml bind-mounts the Ray auth token at ~/.ray/auth_token; create the folder as `ray` so
# docker does not create it root-owned.
RUN mkdir -p /home/ray/.ray

# OMP_WAIT_POLICY: torch's OpenMP threads sleep instead of spinning while they wait, so Ray
# workers sharing a node's cores do not stall each other (jobs/__init__.py says why).
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_WAIT_POLICY=PASSIVE

# 1) Dependencies first, from the one file of exact pins (own layer: code edits do not
#    re-download torch). torch 2.14.1 from PyPI is the CUDA build on linux/x86_64; it ships its own
#    CUDA runtime, so the host only needs a recent enough NVIDIA driver (see cluster.yaml ImageId).
#    ray[...]==2.60.0 is already installed in the base image; this adds only its extras' deps.
COPY --chown=ray:users requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

# 2) The project itself, without touching the resolved dependency set.
#    README.md is needed because pyproject.toml declares it as the package readme.
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users wsseg_core/ ./wsseg_core/
COPY --chown=ray:users jobs/ ./jobs/
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import wsseg_core, jobs, ray, torch; print('wsseg', wsseg_core.__version__, 'ray', ray.__version__, 'torch', torch.__version__)"

# Jobs submitted with `ray job submit --working-dir .` run from the uploaded tree (it comes first
# on sys.path), so the code baked in here is the fallback; the dependencies are what matter.
USER ray
CMD ["python", "-m", "jobs.pipeline", "--help"]
