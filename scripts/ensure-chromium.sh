#!/usr/bin/env bash
# Browser tests need Debian's Chromium and ChromeDriver (/usr/bin/chromium, /usr/bin/chromedriver).
# Installs them with apt when missing (CI and fresh machines run as root); does nothing otherwise.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "chromium/chromium-driver missing; install them: sudo apt-get install -y chromium chromium-driver" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium chromium-driver >/dev/null
