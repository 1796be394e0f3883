#!/bin/busybox sh
# /init of Tether's test guest (build/guest). PID 1: it must never exit.
/bin/busybox mkdir -p /proc /sys /dev /tmp /run
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
export PATH=/bin
for m in $(cat /etc/modules); do
	insmod "/lib/modules/$m" || echo "TETHER-GUEST-ERROR insmod $m" >/dev/console
done
# The ACPI power button (system_powerdown) runs /etc/acpi/PWRF/00000080.
# The boot marker waits until acpid has opened the input devices: a button
# pressed right after the marker must not be lost.
acpid -f -c /etc/acpi -l /tmp/acpid.log &
acpid=$!
i=0
until ls -l "/proc/$acpid/fd" 2>/dev/null | grep -q /dev/input/event; do
	i=$((i + 1))
	if [ $i -gt 500 ]; then
		echo "TETHER-GUEST-ERROR acpid opened no input device" >/dev/console
		break
	fi
	sleep 0.01
done
# The disk marker: a boot counter in the first 64 bytes of /dev/vda (the
# virtio modules probe synchronously, so the node exists by now if the disk does).
if [ -b /dev/vda ]; then
	n=$(dd if=/dev/vda bs=64 count=1 2>/dev/null | tr -dc '0-9')
	n=$(( ${n:-0} + 1 ))
	printf '%-63d\n' "$n" | dd of=/dev/vda bs=64 count=1 conv=notrunc 2>/dev/null
	sync
	echo "TETHER-GUEST-DISK boot=$n" >/dev/console
fi
echo "TETHER-GUEST-BOOTED" >/dev/console
while true; do
	sleep 3600
done
