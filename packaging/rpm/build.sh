#!/usr/bin/env bash
# Build the RPM (needs rpmbuild): packaging/rpm/build.sh [rpmbuild options]
# e.g. on a Debian box: packaging/rpm/build.sh --nodeps --define "python3_bin $(command -v python3)"
# OUT=dir puts the .rpm files there (default: the current directory).
set -euo pipefail
out=$(realpath "${OUT:-.}")
cd "$(dirname "$0")/../.."
version=$(python3 -c 'import re;print(re.search(r"__version__ = \"(.*)\"", open("networkd/__init__.py").read())[1])')
top=$(mktemp -d)
mkdir -p "$top"/{SOURCES,SPECS,BUILD,RPMS,SRPMS}
git archive --prefix="networkd-$version/" -o "$top/SOURCES/networkd-$version.tar.gz" HEAD
trap 'rm -rf "$top"' EXIT
rpmbuild --define "_topdir $top" "$@" -ba packaging/rpm/networkd.spec
find "$top/RPMS" "$top/SRPMS" -name '*.rpm' -exec cp -v {} "$out" \;
