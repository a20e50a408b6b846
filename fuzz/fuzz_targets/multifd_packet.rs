//! Fuzzes what a multifd channel's thread on the destination parses: the handshake, then
//! packets (fixed header, page-offset and hash table, checksum) and their data (raw pages,
//! or zlib/zstd data decompressed into pages), applied to 4 MiB of real guest RAM with the
//! page bookkeeping a migration uses.
//!
//! Input: a control byte (see `ferry_fuzz`: bit 0 clear = reseal checksums), then the bytes
//! a channel carries. Checked: no panic; decoded offsets lie inside RAM; after a packet its
//! zero pages read as zeros and a normal page is suspect exactly when its bytes do not
//! match its hash; decompression yields exactly the announced pages or an error.

#![no_main]

use ferry_fuzz::{control, ram, reseal_multifd};
use libfuzzer_sys::fuzz_target;
use migration::dest::loader::PageBook;
use migration::multifd::compress::Decompressor;
use migration::multifd::packet::{
    Handshake, PacketHeader, PacketPages, HANDSHAKE_LEN, PACKET_HEADER_LEN,
};
use ram::{PAGE_SHIFT, PAGE_SIZE};

fn take<'a>(input: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if input.len() < n {
        return None;
    }
    let (head, rest) = input.split_at(n);
    *input = rest;
    Some(head)
}

fuzz_target!(|data: &[u8]| {
    let Some((reseal, rest)) = control(data) else {
        return;
    };
    let mut buf = rest.to_vec();
    if reseal {
        reseal_multifd(&mut buf);
    }
    let mut input = &buf[..];
    let Some(Ok(hs)) = take(&mut input, HANDSHAKE_LEN)
        .and_then(|b| <&[u8; HANDSHAKE_LEN]>::try_from(b).ok())
        .map(Handshake::decode)
    else {
        return;
    };
    let ram = ram();
    let ram_size = ram.size();
    let book = PageBook::new(ram_size >> PAGE_SHIFT, false);
    let Ok(mut decompressor) = Decompressor::new(hs.method) else {
        return;
    };
    let mut pages = PacketPages::default();
    let mut scratch = Vec::new();
    while let Some(head) = take(&mut input, PACKET_HEADER_LEN) {
        let Ok(head) = <&[u8; PACKET_HEADER_LEN]>::try_from(head) else {
            return;
        };
        let Ok(h) = PacketHeader::decode(head, hs.method) else {
            return;
        };
        let Some(tail) = take(&mut input, h.tail_len()) else {
            return;
        };
        if pages.decode_tail(head, &h, tail, ram_size).is_err() {
            return;
        }
        assert_eq!(pages.normal.len(), h.normal_pages as usize);
        assert_eq!(pages.zero.len(), h.zero_pages as usize);
        for &o in pages.normal.iter().map(|(o, _)| o).chain(&pages.zero) {
            assert!(o < ram_size && o % PAGE_SIZE as u64 == 0, "offset {o:#x}");
        }
        let Some(area) = take(&mut input, h.next_packet_size as usize) else {
            return;
        };
        if !pages.normal.is_empty() {
            let want = pages.normal.len() * PAGE_SIZE;
            let bytes: &[u8] = if h.is_compressed() {
                scratch.resize(want, 0);
                if decompressor.decompress(area, &mut scratch).is_err() {
                    return;
                }
                &scratch
            } else {
                area
            };
            assert_eq!(bytes.len(), want, "raw data of the wrong size accepted");
            for (i, &(offset, hash)) in pages.normal.iter().enumerate() {
                let page = offset >> PAGE_SHIFT;
                let src = &bytes[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
                ram.write_page(page, src)
                    .expect("offset checked against RAM");
                let ok = ram
                    .page(page)
                    .is_some_and(|b| xxhash_rust::xxh3::xxh3_64(b) == hash);
                book.mark(page, ok);
            }
        }
        for &offset in &pages.zero {
            book.load_zero(&ram, offset >> PAGE_SHIFT)
                .expect("offset checked against RAM");
        }
        for &offset in &pages.zero {
            let page = offset >> PAGE_SHIFT;
            assert!(ram.page(page).is_some_and(|b| b.iter().all(|&x| x == 0)));
            assert!(!book.is_suspect(page));
        }
        for &(offset, hash) in &pages.normal {
            let page = offset >> PAGE_SHIFT;
            let later = pages.normal.iter().filter(|(o, _)| *o == offset).count() > 1
                || pages.zero.contains(&offset);
            if !later {
                let matches = ram
                    .page(page)
                    .is_some_and(|b| xxhash_rust::xxh3::xxh3_64(b) == hash);
                assert_eq!(book.is_suspect(page), !matches);
            }
        }
    }
    let _ = book.check_complete();
});
