#!/usr/bin/env bash
# Prepares openCryptoki's software token, labelled "ockkms", as a second
# PKCS#11 implementation for kms-hsm's tests (hsm/tests/opencryptoki.rs) and
# for trying `kms serve` against it by hand. Idempotent; safe to run
# concurrently (one flock).
#
#   1. starts pkcsslotd (openCryptoki's slot daemon) unless it is running;
#      that needs root, as the daemon owns /var/lib/opencryptoki;
#   2. finds the software token's slot (model "IBM SoftTok") in whatever
#      /etc/opencryptoki/opencryptoki.conf configures (Debian's default lists
#      it as slot 3; the other default slots have no token on a plain machine);
#   3. if that token is not initialized, initializes it with the label
#      "ockkms" (pkcsconf -I with openCryptoki's default SO PIN), sets the SO
#      PIN (-P), the user PIN (-u) and changes it once (-p) so that no
#      "PIN to be changed" flag remains;
#   4. writes the user PIN to $KMS_OCK_STATE/user.pin (0600).
#
# The PINs below are public test PINs of a throw-away software token: never
# use this script for a token that protects anything. It refuses to touch a
# software token that someone else initialized under another label.
#
# Prints, on success, KEY=VALUE lines: module=, slot=, label=, pin_file=.
# Exit status: 0 ready; 3 openCryptoki is not installed; 4 pkcsslotd is not
# running and this user cannot start it (not root); 1 anything else.
set -euo pipefail

LABEL=ockkms
MODULE=${KMS_OCK_MODULE:-/usr/lib/x86_64-linux-gnu/pkcs11/libopencryptoki.so}
STATE=${KMS_OCK_STATE:-/var/lib/kms-opencryptoki}
DEFAULT_SO_PIN=87654321 # openCryptoki's documented factory SO PIN
SO_PIN=kmsso123         # openCryptoki PINs are 4 to 8 characters
FIRST_USER_PIN=kmsfirst
USER_PIN=kmsusr12
PIDFILE=/var/run/pkcsslotd.pid
SOCKET=/var/run/pkcsslotd.socket

say() { echo "opencryptoki-token: $*" >&2; }

if [ ! -x /usr/sbin/pkcsslotd ] || ! command -v pkcsconf >/dev/null || [ ! -e "$MODULE" ]; then
  say "openCryptoki is not installed (apt-get install opencryptoki)"
  exit 3
fi

slotd_running() {
  local pid
  pid=$(cat "$PIDFILE" 2>/dev/null) || return 1
  # A killed daemon may linger as a zombie with the same name: not running.
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = pkcsslotd ] \
    && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null && [ -S "$SOCKET" ]
}

if [ "$(id -u)" -eq 0 ]; then
  mkdir -p "$STATE"
  chmod 700 "$STATE"
  exec 9>"$STATE/.lock"
  flock 9
fi

if ! slotd_running; then
  if [ "$(id -u)" -ne 0 ]; then
    say "pkcsslotd is not running and only root can start it"
    exit 4
  fi
  # The lock and state directories live partly on tmpfs (/run/lock).
  if command -v systemd-tmpfiles >/dev/null && [ -f /usr/lib/tmpfiles.d/opencryptoki.conf ]; then
    systemd-tmpfiles --create /usr/lib/tmpfiles.d/opencryptoki.conf
  fi
  say "starting pkcsslotd"
  # It forks into the background and writes $PIDFILE; it must not inherit
  # the lock (fd 9), or every later run would wait for it forever.
  /usr/sbin/pkcsslotd 9>&-
  for _ in $(seq 100); do
    slotd_running && break
    sleep 0.1
  done
  slotd_running || { say "pkcsslotd did not start"; exit 1; }
fi

if [ "$(id -u)" -ne 0 ]; then
  # Not root but the daemon runs: usable only if someone prepared the token.
  if [ -r "$STATE/user.pin" ]; then
    slot=$(cat "$STATE/slot")
    printf 'module=%s\nslot=%s\nlabel=%s\npin_file=%s\n' "$MODULE" "$slot" "$LABEL" "$STATE/user.pin"
    exit 0
  fi
  say "the token is not prepared and only root can prepare it"
  exit 4
fi

# The software token's slot and its current label and flags, from pkcsconf -t.
token_field() { # $1 = slot, $2 = field name
  pkcsconf -c "$1" -t 2>/dev/null | sed -n "s/^[[:space:]]*$2: //p" | head -n1
}
slot=""
for s in $(pkcsconf -t 2>/dev/null | sed -n 's/^Token #\([0-9]*\) Info:.*/\1/p'); do
  if [ "$(token_field "$s" Model | sed 's/[[:space:]]*$//')" = "IBM SoftTok" ]; then
    slot=$s
    break
  fi
done
if [ -z "$slot" ]; then
  say "no software token (libpkcs11_sw.so) configured in /etc/opencryptoki/opencryptoki.conf"
  exit 1
fi

label=$(token_field "$slot" Label | sed 's/[[:space:]]*$//')
flags=$(token_field "$slot" Flags)

if [[ "$flags" == *"|TOKEN_INITIALIZED|"* || "$flags" == *"(TOKEN_INITIALIZED|"* ]]; then
  if [ "$label" != "$LABEL" ]; then
    say "the software token in slot $slot is initialized with label \"$label\"; refusing to re-initialize it"
    exit 1
  fi
  if [[ "$flags" == *USER_PIN_INITIALIZED* && "$flags" != *USER_PIN_TO_BE_CHANGED* ]] \
    && [ -f "$STATE/user.pin" ] && [ "$(cat "$STATE/user.pin")" = "$USER_PIN" ]; then
    echo "$slot" >"$STATE/slot"
    printf 'module=%s\nslot=%s\nlabel=%s\npin_file=%s\n' "$MODULE" "$slot" "$LABEL" "$STATE/user.pin"
    exit 0
  fi
  # Ours, but half set up (e.g. interrupted): start over with our SO PIN.
  current_so=$SO_PIN
else
  current_so=$DEFAULT_SO_PIN
fi

say "initializing the software token in slot $slot as \"$LABEL\""
echo "$LABEL" | pkcsconf -c "$slot" -I -S "$current_so" >/dev/null
if [ "$current_so" != "$SO_PIN" ]; then
  pkcsconf -c "$slot" -P -S "$current_so" -n "$SO_PIN" >/dev/null
fi
pkcsconf -c "$slot" -u -S "$SO_PIN" -n "$FIRST_USER_PIN" >/dev/null
pkcsconf -c "$slot" -p -U "$FIRST_USER_PIN" -n "$USER_PIN" >/dev/null

(umask 077 && printf '%s' "$USER_PIN" >"$STATE/user.pin")
echo "$slot" >"$STATE/slot"
printf 'module=%s\nslot=%s\nlabel=%s\npin_file=%s\n' "$MODULE" "$slot" "$LABEL" "$STATE/user.pin"
