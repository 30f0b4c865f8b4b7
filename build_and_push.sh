#!/usr/bin/env bash
# Builds the review-trainer image and pushes it to Amazon ECR; prints the image URI.
#
#   ./build_and_push.sh [--name review-trainer] [--tag 0.1.0] [--region eu-west-1] [--target gpu|cpu|neuron]
#                       [--platform linux/amd64] [--weights hub:MODEL_ID@REVISION | local:DIR]
#
# The region comes from --region, then AWS_REGION, AWS_DEFAULT_REGION, then `aws configure get
# region`; the account from `aws sts get-caller-identity`. The repository is created (with scan on
# push) when missing. The image is tagged with the tag and with the git revision.
set -euo pipefail

name="review-trainer"
tag="$(sed -n 's/^version = "\(.*\)"/\1/p' "$(dirname "$0")/code/pyproject.toml")"
region=""
target="gpu"
platform="linux/amd64"
weights="hub:distilbert-base-uncased@12040accade4e8a0f71eabdb258fecc2e7e948be"

die() {
    echo "build_and_push.sh: $*" >&2
    exit 1
}

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --name) name="${2:?--name needs a value}"; shift 2 ;;
        --tag) tag="${2:?--tag needs a value}"; shift 2 ;;
        --region) region="${2:?--region needs a value}"; shift 2 ;;
        --target) target="${2:?--target needs a value}"; shift 2 ;;
        --platform) platform="${2:?--platform needs a value}"; shift 2 ;;
        --weights) weights="${2:?--weights needs a value}"; shift 2 ;;
        -h | --help) usage 0 ;;
        *) echo "build_and_push.sh: unknown option $1" >&2; usage 2 ;;
    esac
done

# Every option and the weights' hashes are checked before any AWS call: a bad option leaves no
# empty ECR repository behind.
[[ "$target" == "gpu" || "$target" == "cpu" || "$target" == "neuron" ]] \
    || die "--target must be gpu, cpu or neuron, not '$target'"
# ECR's rule for repository names, and Docker's for tags.
[[ "$name" =~ ^[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*$ && ${#name} -ge 2 && ${#name} -le 256 ]] \
    || die "--name '$name' is not an ECR repository name (lowercase letters, digits, and . _ - / between them)"
[[ "$tag" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] \
    || die "--tag '$tag' is not a Docker tag (letters, digits, _ . -, up to 128, not starting with . or -)"
[[ "$platform" == "linux/amd64" || "$platform" == "linux/arm64" ]] \
    || die "--platform must be linux/amd64 or linux/arm64, not '$platform'"
# AWS publishes the Neuron base image (and Trainium instances are) for x86-64 only.
[[ "$target" != "neuron" || "$platform" == "linux/amd64" ]] \
    || die "--target neuron needs --platform linux/amd64 (the Neuron base image is x86-64 only), not '$platform'"
weights_dir="$(dirname "$0")/docker/weights"
required_files=(config.json model.safetensors vocab.txt)
case "$weights" in
    hub:*@*)
        model_id="${weights#hub:}"; model_id="${model_id%@*}"; revision="${weights##*@}"
        sums_file="$weights_dir/$model_id/$revision.sha256"
        [[ -f "$sums_file" ]] || die "no recorded hashes for $model_id@$revision: $sums_file is missing;" \
            "record them first (docker/weights/README.md), or build from a folder with --weights local:DIR"
        for file in "${required_files[@]}"; do
            grep -Eq "^[0-9a-f]{64}  \*?$file\$" "$sums_file" || die "$sums_file has no SHA-256 for $file"
        done
        weights_args=(--build-arg PRETRAINED_SOURCE=hub --build-arg "PRETRAINED_MODEL_ID=$model_id"
                      --build-arg "PRETRAINED_REVISION=$revision") ;;
    local:*)
        local_dir="$weights_dir/${weights#local:}"
        [[ -d "$local_dir" ]] || die "--weights ${weights}: $local_dir is not a folder (local weights live under docker/weights/)"
        for file in "${required_files[@]}"; do
            [[ -f "$local_dir/$file" ]] || die "$local_dir lacks $file: expected a Hugging Face checkpoint folder"
        done
        if [[ -f "$local_dir/SHA256SUMS" ]]; then
            mismatch="$(cd "$local_dir" && sha256sum --quiet -c SHA256SUMS 2>&1)" \
                || die "$local_dir does not match its SHA256SUMS: $(echo "$mismatch" | tr '\n' ' ')"
        fi
        weights_args=(--build-arg PRETRAINED_SOURCE=local --build-arg "PRETRAINED_LOCAL_DIR=${weights#local:}") ;;
    *) die "--weights must be hub:MODEL_ID@REVISION or local:DIR (a folder under docker/weights/), not '$weights'" ;;
esac

command -v aws >/dev/null || die "the aws CLI is not installed (https://docs.aws.amazon.com/cli/)"
command -v docker >/dev/null || die "docker is not installed or not on PATH"
docker info >/dev/null 2>&1 || die "docker cannot reach a Docker engine: start it, or check your permissions"

region="${region:-${AWS_REGION:-${AWS_DEFAULT_REGION:-$(aws configure get region || true)}}}"
[[ -n "$region" ]] || die "no AWS region: pass --region, or set AWS_REGION or AWS_DEFAULT_REGION"

account="$(aws sts get-caller-identity --query Account --output text 2>/dev/null)" \
    || die "no usable AWS credentials (aws sts get-caller-identity failed): run 'aws configure' or set AWS_PROFILE"

registry="$account.dkr.ecr.$region.amazonaws.com"
image="$registry/$name"
revision="$(git -C "$(dirname "$0")" rev-parse --short HEAD 2>/dev/null || echo unknown)"

if ! aws ecr describe-repositories --region "$region" --repository-names "$name" >/dev/null 2>&1; then
    echo "creating ECR repository $name in $region"
    aws ecr create-repository --region "$region" --repository-name "$name" \
        --image-scanning-configuration scanOnPush=true >/dev/null \
        || die "could not create the ECR repository $name in $region"
fi

aws ecr get-login-password --region "$region" \
    | docker login --username AWS --password-stdin "$registry" \
    || die "docker login to $registry failed"

docker build --target "$target" --platform "$platform" \
    --build-arg "VERSION=$tag" --build-arg "REVISION=$revision" "${weights_args[@]}" \
    -t "$image:$tag" -t "$image:$revision" "$(dirname "$0")" \
    || die "docker build failed"

for pushed_tag in "$tag" "$revision"; do
    docker push "$image:$pushed_tag" || die "docker push of $image:$pushed_tag was refused"
done

echo "$image:$tag"
