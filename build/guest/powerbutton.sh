#!/bin/sh
# busybox acpid runs this on the ACPI power button event (PWRF 00000080).
echo "TETHER-GUEST-POWERDOWN" >/dev/console
sync
poweroff -f
