# Source this on a GPU machine whose image lacks libaio, before a run with offload nvme:
#     source benchmarks/device_libaio.sh [DEB_DIR]
# It unpacks the carried libaio1 and libaio-dev debs (DEB_DIR, default .deb/, fetched on a machine with the
# Debian registry by `apt-get download libaio1 libaio-dev`) into a prefix, and points the compiler (CPATH,
# LIBRARY_PATH: gcc and nvcc read them, DeepSpeed's io_submit probe reads CFLAGS/LDFLAGS) and the loader
# (LD_LIBRARY_PATH) at it, so DeepSpeed's AsyncIOBuilder can JIT-build its async_io op there.
_aio_debs=${1:-.deb}
_aio_prefix=${AIO_PREFIX:-/tmp/libaio}
mkdir -p "$_aio_prefix"
for _deb in "$_aio_debs"/libaio*.deb; do
    if command -v dpkg >/dev/null 2>&1; then
        dpkg -x "$_deb" "$_aio_prefix"
    else  # no dpkg: a .deb is an ar archive whose data.tar.* holds the files
        (cd "$(mktemp -d)" && ar x "$OLDPWD/$_deb" && tar -xf data.tar.* -C "$_aio_prefix")
    fi
done
_aio_lib="$_aio_prefix/usr/lib/x86_64-linux-gnu"
export CPATH="$_aio_prefix/usr/include${CPATH:+:$CPATH}"
export LIBRARY_PATH="$_aio_lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$_aio_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CFLAGS="-I$_aio_prefix/usr/include${CFLAGS:+ $CFLAGS}" LDFLAGS="-L$_aio_lib${LDFLAGS:+ $LDFLAGS}"
ls -l "$_aio_lib"/libaio.so* >&2
