#!/usr/bin/env bash
# Builds deploy/Containerfile with buildah and runs agentd inside the image.
#
# No container registry is reachable here, so the two base images the Containerfile names
# are first made locally, under those names, from what is reachable:
# - debian:bookworm-slim: a minimal Debian bookworm from Debian's packages (debootstrap);
# - rust:X.Y-slim-bookworm: that, plus gcc and libc6-dev (as the official image has), plus
#   this machine's Rust toolchain, which must be the X.Y the Containerfile names, and the
#   certificate authorities this machine adds (its egress proxy's).
# The image is then built with --pull=never, exactly as `podman build` would build it from
# the registry's images. RUN steps use buildah's chroot isolation (no container runtime).
set -euo pipefail
cd "$(dirname "$0")/../.."
containerfile=deploy/Containerfile
image=localhost/agentd:ci
export BUILDAH_ISOLATION=chroot

missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

have_image() { buildah inspect --type image "$1" >/dev/null 2>&1; }
debian=$(sed -n 's/^FROM \(docker.io\/library\/debian:[^ ]*\).*/\1/p' "$containerfile" | head -n 1)
rust=$(sed -n 's/^FROM \(docker.io\/library\/rust:[^ ]*\).*/\1/p' "$containerfile" | head -n 1)
[ -n "$debian" ] && [ -n "$rust" ] || { echo "$containerfile: no debian or rust FROM line" >&2; exit 1; }

if ! have_image "$debian"; then
  echo "making $debian with debootstrap"
  rootfs=$(mktemp -d)
  debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >/dev/null
  rm -f "$rootfs"/var/cache/apt/archives/*.deb
  ctr=$(buildah from scratch)
  cp -a "$rootfs"/. "$(buildah mount "$ctr")"/
  buildah umount "$ctr" >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd bash "$ctr"
  buildah commit -q "$ctr" "$debian" >/dev/null
  buildah rm "$ctr" >/dev/null
  rm -rf "$rootfs"
fi

if ! have_image "$rust"; then
  wanted=$(echo "$rust" | sed 's/.*rust:\([0-9]*\.[0-9]*\).*/\1/')
  case "$(rustc --version)" in
    "rustc $wanted."*) ;;
    *) echo "$rust: this machine has $(rustc --version), not Rust $wanted" >&2; exit 1 ;;
  esac
  echo "making $rust from $debian and $(rustc --version)"
  sysroot=$(rustc --print sysroot)
  ctr=$(buildah from --pull=never "$debian")
  # The certificate authorities this machine adds (its egress to crates.io goes through a
  # proxy that signs with its own): cargo inside must trust what cargo outside does.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    buildah copy -q "$ctr" /usr/local/share/ca-certificates/ /usr/local/share/ca-certificates/ >/dev/null
  fi
  buildah run "$ctr" -- sh -c 'apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
       gcc libc6-dev ca-certificates >/dev/null \
    && rm -rf /var/lib/apt/lists/*'
  for part in bin lib libexec etc; do
    buildah copy -q "$ctr" "$sysroot/$part" "/usr/local/rust/$part" >/dev/null
  done
  buildah config \
    --env PATH=/usr/local/rust/bin:/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env CARGO_HOME=/usr/local/cargo "$ctr"
  buildah commit -q "$ctr" "$rust" >/dev/null
  buildah rm "$ctr" >/dev/null
fi

echo "building $containerfile"
buildah build --pull=never --layers=false -f "$containerfile" -t "$image" .

echo "running agentd in $image"
ctr=$(buildah from --pull=never "$image")
trap 'buildah rm "$ctr" >/dev/null' EXIT
buildah inspect --type image \
  --format 'entrypoint {{.OCIv1.Config.Entrypoint}}, user {{.OCIv1.Config.User}}' "$image"
buildah run "$ctr" -- sh -c '
  set -e
  agentd --version
  agentctl --version
  tini --version
  agentd --data-dir /tmp/agentd --cgroups off >/tmp/ready 2>/tmp/log &
  daemon=$!
  for _ in $(seq 200); do [ -s /tmp/ready ] && break; sleep 0.05; done
  cat /tmp/ready
  out=$(agentctl --socket /tmp/agentd/agentd.sock run -- python3 -c "print(\"hello from the image\")")
  kill "$daemon"
  wait "$daemon"
  [ "$out" = "hello from the image" ] || { echo "agent said: $out"; cat /tmp/log; exit 1; }
  echo "an agent ran inside the image: $out"
'
