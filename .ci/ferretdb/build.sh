#!/usr/bin/env bash
# Builds FerretDB v1.24.2 from its module on the Go module proxy into "$1".
# `go install …@v1.24.2` does not work as is: the proxy refuses the module's version list (so the
# deprecation check fails) and the module's zip lacks build/version/version.txt, which the binary
# needs at start. So: download the module, add the version file, build it in a scratch copy.
set -euo pipefail
out=$1
version=v1.24.2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PATH="$PATH:/usr/local/go/bin"
if ! command -v go >/dev/null; then
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go
fi
cd "$work"
go mod init ferretdb-build >/dev/null 2>&1
dir=$(GOFLAGS=-mod=mod go mod download -json "github.com/FerretDB/FerretDB@$version" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')
cp -r "$dir" src
chmod -R u+w src
echo "$version" >src/build/version/version.txt
(cd src && CGO_ENABLED=0 go build -trimpath -o "$out.tmp" ./cmd/ferretdb)
mv "$out.tmp" "$out"
"$out" --version | sed -n 1p # reads all of it: head would close the pipe early (SIGPIPE, exit 141 under pipefail)
