package vm

import (
	"context"
	"time"
)

// diskFor makes a VM's disk at path for img: a pooled overlay when the VM
// keeps the base's size and the pool has one, qemu-img otherwise.
// Rejected pool entries are counted and logged (rate-limited); they never
// fail the create.
func (b *Backend) diskFor(ctx context.Context, img Image, path string, size int64) error {
	if b.cfg.OverlayPool > 0 && (size == 0 || size == img.VirtualSize) {
		ok, rejected := b.cfg.Images.TakeOverlay(img, path)
		for _, err := range rejected {
			b.m.overlays.WithLabelValues("rejected").Inc()
			if ok, suppressed := b.lim.Allow("overlay_rejected"); ok {
				b.logger.Warn("pooled overlay rejected", "image", img.Name, "err", err, "suppressed", suppressed)
			}
		}
		if ok {
			b.m.overlays.WithLabelValues("hit").Inc()
			return nil
		}
		b.m.overlays.WithLabelValues("miss").Inc()
	}
	return b.cfg.Images.Overlay(ctx, img, path, size)
}

// refill asks the filler to top the pools up; it never blocks.
func (b *Backend) refill() {
	select {
	case b.fill <- struct{}{}:
	default: // one is pending: it will see this use too
	}
}

// fillOverlays keeps every image's pool at cfg.OverlayPool: at start, when
// asked (after each VM start, so that qemu-img does not compete with the
// create path or with QEMU's own start), and every cfg.OverlayRescan. It
// ends at Close.
func (b *Backend) fillOverlays() {
	defer b.wg.Done()
	t := time.NewTicker(b.cfg.OverlayRescan)
	defer t.Stop()
	for {
		b.topUp()
		select {
		case <-b.ctx.Done():
			return
		case <-b.fill:
		case <-t.C:
		}
	}
}

// topUp fills the pool of each image of the store.
func (b *Backend) topUp() {
	imgs, err := b.cfg.Images.List()
	if err != nil {
		b.fillFailed("", err)
		return
	}
	for _, img := range imgs {
		if err := b.cfg.Images.FillOverlays(b.ctx, img, b.cfg.OverlayPool); err != nil && b.ctx.Err() == nil {
			b.fillFailed(img.Name, err)
		}
	}
}

func (b *Backend) fillFailed(image string, err error) {
	b.m.overlays.WithLabelValues("fill_error").Inc()
	if ok, suppressed := b.lim.Allow("overlay_fill " + image); ok {
		b.logger.Warn("fill overlay pool failed", "image", image, "err", err, "suppressed", suppressed)
	}
}
